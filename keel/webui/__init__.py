"""`keel web-ui` (launch.py): the FastAPI app (app.py), form checks and the argv they become (forms.py), child
processes and the run list (runs.py). The top layer: it may import any other."""
