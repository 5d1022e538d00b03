"""The producer farm: where producers and consumers meet."""
