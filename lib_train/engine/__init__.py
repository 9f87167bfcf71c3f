"""Training: settings, the loop, loss, optimizers and schedules, the network and its module types, the live
model's guard, and the kohya-format files it writes."""
