"""The user's side: Cluster and Session, no engine internals."""
