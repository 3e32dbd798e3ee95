"""Serving: `keel infer` (infer.py), `keel deploy` (deploy.py: the command; server.py: the app; api.py: OpenAI
request validation and the key/body-size middleware; queue.py: turns on the model), and the feedback store
(feedback.py, `keel feedback export`). Imports core, model and data."""
