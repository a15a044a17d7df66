"""The fuzzing prompt: are the marked tokens the ones the explanation is about? (worked example not about the domains)."""

from safesail.interpret.scoring.prompts.binary import Task

TASK = Task(
    version="fuzz-v2",
    intro=("We study latents (neurons) inside a language model. Each latent looks for one particular thing in a "
           "text. In each excerpt below some tokens are marked <<like this>>. Given an explanation of what a "
           "latent looks for, say whether the marks are on the tokens the explanation describes: yes if the "
           "marked tokens fit the explanation, no if the marks are on unrelated tokens."),
    example_explanation="words about food and eating",
    examples=(("We had <<pizza>> and salad for lunch.", True),
              ("We had pizza and salad <<for>> lunch.", False),
              ("She poured the <<soup>> into a bowl.", True),
              ("She <<poured>> the soup into a bowl.", False)),
)
