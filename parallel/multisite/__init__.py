"""Multi-site training: ``groups`` (the world split into equal sites; EP, ZeRO and router counts
stay inside one) and ``outer`` (the DiLoCo-style outer step across sites: streamed fragments,
compressed deltas, overlap)."""
