"""On-demand dumps (docs/dumps.md): the controller hands out chunks of tables, the dumper reads
them on a logical replica, the gateway delivers their rows to the URI that asked."""
