"""Configuration at the edge: the typed schema (`schema`), dict <-> Config (`parse`), the key=value grammar and
config files (`overrides`), output paths (`paths`) and every command's help (`usage`)."""
