"""shardprop's product surface: the `shardprop` command, and the job service."""
