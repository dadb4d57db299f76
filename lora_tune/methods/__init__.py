"""Fine-tuning methods behind the recipe's `adapter:` section: validation rules (torch-free) and the run-time
pieces (model preparation, optimizer, callbacks, saving) that differ between methods."""
