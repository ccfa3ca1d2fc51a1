"""The feature recipe (recipe, pixels, perturb, lare math, sd models); may import stages.genimage only."""
