"""Fine-tuning methods: one module (or folder, `lora/`) per method, each exporting its `METHOD`
record; `registry` maps `--method` names to them. `hooks` is what a method may change in the
training loop."""
