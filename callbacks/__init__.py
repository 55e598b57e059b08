"""Lightning callbacks of the topdown framework."""
