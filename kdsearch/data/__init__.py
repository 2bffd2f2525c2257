"""Tasks and their data: the task table (`tasks`), loading local, hub and built-in data (`loading`), tokenisation
(`encoding`), metrics and the model hub's reach (`hub`)."""
