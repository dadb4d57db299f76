"""Before a run: the memory plan, a model's shape, the recipe catalog and `lora-tune new`."""
