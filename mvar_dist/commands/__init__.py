"""One module per ``mvar-dist`` command, named after it: parse the arguments, call the library,
report. Library modules never import from here."""
