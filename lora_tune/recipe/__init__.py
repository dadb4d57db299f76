"""The recipe: typed config (schema), reading YAML (load), and the rules that refuse what cannot work."""
