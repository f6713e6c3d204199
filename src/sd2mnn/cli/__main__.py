from sd2mnn.cli import entry

entry()
