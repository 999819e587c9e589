"""Processes Dagster launches through Pipes: the external side of the protocol (`dagster_pipes`,
a small package that never imports dagster), kept out of `lib/` so the library stays plain."""
