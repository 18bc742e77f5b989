"""SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017) as pure functions and small
state machines: key agreement, authenticated encryption of shares, Shamir sharing,
mask expansion, the site's and the coordinator's side of each stage. No flwr here."""
