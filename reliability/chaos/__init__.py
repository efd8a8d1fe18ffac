"""A Jepsen-style chaos campaign for Squall: a randomized fault schedule
drawn from a seed, clients that record a history, and a checker that proves
nothing was lost silently. Run it with ``python -m reliability.chaos``; see
reliability/chaos/README.md."""
