"""hnet: one hypernetwork generating vision->text connectors for many frozen encoders."""
