"""shardprop's distribution layer: gradient workers and parameter servers as
Ray actors, the per-job coordinator that drives them step by step, and the
checkpoints that let a job survive failures. The maths all comes from core."""
