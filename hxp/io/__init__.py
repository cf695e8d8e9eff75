"""Edge modules that run external programs or touch hosts; the rest of `hxp` stays pure."""
