"""The names a user picks among (samplers, noise priors, FreeInit filters), torch-free so the command line's parser
and `--help` load no torch; their implementations live beside them in this wing."""

SAMPLER_NAMES = ("ddim", "dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-ancestral", "heun", "lms", "pndm", "unipc",
                 "lcm", "mcm", "t2v-turbo")
NOISE_PRIORS = ("iid", "videofusion")
FREE_INIT_FILTERS = ("gaussian", "butterworth", "ideal")
