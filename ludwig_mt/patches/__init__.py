"""Every patch the project applies to Ludwig 0.17.10 (and to transformers, peft, accelerate as Ludwig uses them).

- :mod:`ludwig_mt.patches.registry`: THE table (name, targets, purpose, kind, switch, versions), ``apply_all``;
- :mod:`ludwig_mt.patches.core`: the record type, the one wrap-and-rebind helper, the version guard;
- the patch bodies, by kind: :mod:`.fixes` (correctness), :mod:`.speedups`, :mod:`.distributed`,
  :mod:`.instrumentation` (evidence and drills); :mod:`.model_loading` is the one stand-in loader some of them share.

``python -m ludwig_mt.patches`` prints the table and checks the installed versions. This file imports nothing, so
importing :mod:`.core` (the import hook does, at every interpreter start) stays cheap.
"""
