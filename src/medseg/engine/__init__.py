"""Engine: the Lightning module and trainer factory, evaluate, predict, benchmark, the demo."""
