"""What every task's evaluation shares: opening a finished run, the scores, the result and the reports (each task
scores in lora_tune/tasks/<task>/evaluate.py)."""
