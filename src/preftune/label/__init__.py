"""Labelling library: items read from a samples file (``items``), and a labels file that a judge
fills (``session``, ``store``). The command is ``preftune.commands.label``; the web UI a person labels
in is ``preftune collect``'s app over a one-annotator project (``preftune.collect.local``).
"""
