"""OfflineDB: on-demand, masked, near-real-time copies of source databases behind one
PostgreSQL endpoint (snapshots taken with pg_basebackup, a wire-protocol proxy, copies kept
fresh from the change log)."""
