"""The commands behind run.sh (train, demo, ...): the top layer, importing eval, prep and ludwig_mt."""
