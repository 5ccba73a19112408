"""Sampling: noise schedules, samplers as stateless functions with one signature (+ classifier-free guidance),
diffusers-style scheduler objects, prediction -> x0 conversion, multistep solvers, noise priors, step caching.

May import: `models` and the leaves (`media`, `errors`, `devices`)."""
