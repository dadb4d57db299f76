"""`lora-tune ui`: a web page over the same library and the same commands (NiceGUI).

The form is the recipe schema (`form.py`), the runs are the folders and locks lora-tune writes (`runs.py`), and
every long action is the `lora-tune` command itself in a child process (`jobs.py`), so a run started here is a run
started in a terminal. `app.py` lays out the page; nothing in this package trains, evaluates or exports by itself.
"""
