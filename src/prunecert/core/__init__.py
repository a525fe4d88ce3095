"""The ground floor every stage shares (DESIGN §2): the problem and its arithmetic.

- `pair`: two networks of one architecture, the object certification and attacks work on;
- `completion`: a compact pruned network mapped back onto its original's shape, and `make_pair`;
- `surgery`: cutting neurons/channels out of a network (used by pruning and completion);
- `regions`: the input regions (Box, L2Ball, Domain) and `region_options` their construction from specs;
- `region_batch`: `RegionBatch`, B regions as every bound method takes them (boxes, optional L2 balls),
  checked once when built;
- `interval`, `rounding`: interval arithmetic and the floating-point margins every bound uses.

It imports only errors/network/io/data, never prune, certify, adversarial, audit or cli.
"""
