"""Data: the conversation record format (conversations.py), how its loader recognises an unfinished `avar synth`
output (synth_output.py) and the procedural visual-reasoning task generator (procedural.py)."""
