"""The live viewer: a Qt-free model of what is shown, and the pyqtgraph window."""
