"""The neuron database: a versioned SQLite file of latents, explanations, scores, tags and examples.

`NeuronDB` (store.py) is the read API the diagnose stage uses; `build.py` makes
the DB from a run's interpret outputs; `import_safesail.py` / `export_safesail.py`
read and write Safe-SAIL's release layout; `cli.py` is `safesail db ...`.
"""

from safesail.neurondb.store import NeuronDB

__all__ = ["NeuronDB"]
