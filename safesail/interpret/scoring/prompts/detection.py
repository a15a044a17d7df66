"""The detection prompt: does the explanation apply to this excerpt? (worked example not about the domains)."""

from safesail.interpret.scoring.prompts.binary import Task

TASK = Task(
    version="det-v2",
    intro=("We study latents (neurons) inside a language model. Each latent looks for one particular thing in a "
           "text. Given an explanation of what a latent looks for, say for each text excerpt whether the latent "
           "fires on it: yes if the excerpt holds what the explanation describes, no otherwise. Most excerpts "
           "get no."),
    example_explanation="words about food and eating",
    examples=(("We had pizza and salad for lunch.", True),
              ("The train leaves the station at noon.", False),
              ("She poured the soup into a bowl.", True),
              ("He painted the fence blue last week.", False)),
)
