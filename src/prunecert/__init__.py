"""prunecert: prune ReLU networks with data-independent coresets, certify and attack the deviation."""

__version__ = "0.1.0"
