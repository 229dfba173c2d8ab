"""A run's folder and its life: layout, lock, record, resume guard, signals, atomic writes, sweeps."""
