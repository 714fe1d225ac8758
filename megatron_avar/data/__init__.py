"""Data: the conversation record format (conversations.py) and the procedural visual-reasoning task
generator (procedural.py)."""
