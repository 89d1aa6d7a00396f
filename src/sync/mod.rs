//! `vtun sync`: plan, delta, agent.
