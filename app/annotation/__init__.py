"""The human half of RLHF inside the product (issue 18): annotators and roles (``roles.py``), the task queue
(``queue.py``) and the trainer workspace at ``/train`` (``workspace.py``)."""
