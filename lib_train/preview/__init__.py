"""The epoch × weight preview grid: its settings, its picture, per-sample Lora weights, choosing a cell."""
