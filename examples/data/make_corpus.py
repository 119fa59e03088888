"""Write the two training corpora shipped with mfa: ``tales.txt`` and ``recipes.txt``.

Both are our own text, produced by a small seeded story/recipe grammar (no outside data), so the
repository can ship them and anyone can rebuild them byte for byte::

    python examples/data/make_corpus.py            # rewrites examples/data/*.txt
    python examples/data/make_corpus.py --check    # exits 1 if the shipped files differ

``tales.txt`` (the pre-training corpus) holds short fables; ``recipes.txt`` (the fine-tuning
corpus) holds recipes, a different register with lists and numbers.  Documents are separated
by one blank line and contain none.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TALES_SEED, TALES_COUNT = 1234, 1500
RECIPES_SEED, RECIPES_COUNT = 5678, 700

# -- tales: the cast, the world, and what can happen in it -------------------------------------

NAMES = [
    "Pim", "Rosa", "Tomas", "Lila", "Bram", "Nell", "Oskar", "Mira", "Fenn", "Ada", "Hugo", "Ivy",
    "Jonas", "Wren", "Milo", "Tess", "Otto", "Clara", "Finn", "Greta", "Leo", "Maud", "Ned", "Ruth",
    "Sami", "Elsa", "Kit", "Nora", "Basil", "Hazel", "Emil", "Juno", "Arlo", "Bea", "Cyril", "Dora",
    "Ezra", "Flora", "Gus", "Hilde", "Ike", "Jett", "Kara", "Lou", "Mabel", "Nico", "Olive", "Percy",
]
# (kind, pronoun): "she", "he", or None for an animal that may be either
KINDS = [
    ("fox", None), ("rabbit", None), ("little girl", "she"), ("old fisherman", "he"),
    ("baker", "she"), ("owl", None), ("bear", None), ("mouse", None), ("young boy", "he"),
    ("goat", None), ("farmer", "he"), ("crow", None), ("turtle", None), ("shepherd girl", "she"),
    ("tailor", "he"), ("squirrel", None), ("otter", None), ("heron", None), ("miller", "he"),
    ("weaver", "she"), ("hedgehog", None), ("lighthouse keeper", "she"), ("badger", None),
    ("potter", "he"), ("duck", None), ("old woman", "she"), ("wolf", None), ("cat", None),
]
PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}
PLACES = [
    "in a small village by the sea", "at the edge of a dark forest", "on a windy hill",
    "beside a slow green river", "in a busy market town", "high in the mountains",
    "in a quiet valley full of apple trees", "on a little island", "near an old stone bridge",
    "in a meadow where the grass grew tall", "at the bottom of a deep canyon", "by a frozen lake",
]
TRAITS = [
    "kind but very shy", "clever and a little proud", "curious about everything", "rather lazy",
    "brave and cheerful", "forgetful but good-hearted", "always in a hurry", "grumpy in the mornings",
    "gentle and patient", "quick to laugh", "careful with every coin", "fond of long walks",
]
LOVES = [
    "singing old songs", "collecting shiny stones", "baking bread", "watching the clouds",
    "telling stories", "mending things", "reading under the big oak", "playing the flute",
    "counting the stars", "growing beans", "painting the sunset", "fishing in the evening",
]
ROUTINES = [
    "walked down to the water to wash {pos} face", "swept the doorstep and fed the birds",
    "gathered berries for breakfast", "went to the well with a wooden bucket",
    "climbed the hill to look at the weather", "lit a small fire and made tea",
    "counted the eggs in the henhouse", "opened every window to let the sun in",
]
# each problem: title, when it can happen, what happened, what the hero wanted, how it ended well
PROBLEMS = [
    ("the Lost {Thing}", ["morning", "spring morning", "summer day"],
     "{Name} woke up and found that {pos} {thing} was gone", "find {pos} {thing}",
     "the {thing} was lying under a pile of leaves, safe and dry"),
    ("the Broken Bridge", ["autumn day", "rainy afternoon"],
     "a great storm broke the bridge over the river", "cross the river before dark",
     "they tied a strong rope between two trees and crossed one step at a time"),
    ("the Dry Well", ["summer day", "hot afternoon"],
     "the old well ran dry and there was no water left", "find fresh water",
     "they found a cold spring bubbling up between the rocks"),
    ("the Long Winter", ["winter night", "frosty morning"],
     "the snow would not stop and the food began to run low", "find enough food for everyone",
     "the neighbours shared their nuts and apples, and nobody went hungry"),
    ("the Shining Sea", ["spring morning", "summer day"],
     "{Name} heard that the sea was the most beautiful thing in the world", "see the sea with {pos} own eyes",
     "they climbed the last dune and there it was, wide and shining"),
    ("the Little Duckling", ["morning", "rainy afternoon", "summer day"],
     "a lost duckling sat crying by the road", "bring the duckling home to its mother",
     "the mother duck came running and hugged the little one"),
    ("the Dark Lighthouse", ["winter night", "stormy evening"],
     "the lamp in the lighthouse went out", "light the lamp before the ships came in",
     "the lamp flared up just as the first sail appeared"),
    ("the Windy Night", ["stormy evening", "autumn day"],
     "the wind carried away the roof of the henhouse", "fix the roof before nightfall",
     "the new roof held tight, and the hens slept warm"),
    ("the Noise in the Cellar", ["winter night", "autumn evening"],
     "a strange sound came from the cellar every night", "find out what was making the noise",
     "it was only an old owl who had made a nest behind the barrels"),
    ("the Apple Harvest", ["autumn day", "autumn morning"],
     "the apples in the orchard were ripe and there were far too many to pick alone",
     "pick every apple before the frost", "by sunset every basket was full"),
]
THINGS = ["red scarf", "silver key", "old map", "wooden whistle", "blue hat", "lucky coin",
          "little bell", "favourite book", "green umbrella", "copper kettle"]
# each obstacle with the ways it can be overcome
OBSTACLES = [
    ("the path was steep and covered in mud", ["{Name2} knew a shortcut through the reeds",
                                               "they held hands and climbed slowly"]),
    ("a cold fog rolled in and hid the way", ["they followed the sound of the river",
                                              "{Name} remembered what {pos} grandmother used to say"]),
    ("a wide ditch blocked the road", ["{Name2} found a long branch to use as a bridge",
                                       "they walked along it until it became narrow"]),
    ("the night came early and the woods grew dark", ["they sang a song to keep their spirits up",
                                                      "the fireflies came out and lit the way"]),
    ("the rain fell so hard that they had to hide under a rock", ["they waited patiently until the sky cleared",
                                                                  "they shared their bread and rested for a while"]),
    ("a grumpy goose would not let them pass", ["{Name} asked the goose politely, and it stepped aside",
                                                "{Name2} offered the goose some seeds"]),
]
LINKS = ["Soon", "Before long", "At first", "On the way"]
MORALS = [
    "a friend in need is a friend indeed", "slow and steady wins the race",
    "many hands make light work", "kindness is never wasted", "it is wise to ask for help",
    "patience can do what hurry cannot", "the best treasures are the ones we share",
    "courage grows when it is used", "a small act of kindness can change a whole day",
]
ASKS = ['"Will you help me?" asked {Name}.', '"I cannot do this alone," said {Name}.',
        '"What shall I do?" {sub} sighed.', '"Oh dear, oh dear," said {Name}.']
ANSWERS = ['"Of course I will help you," said {Name2}.', '"Let us go together," said {Name2} with a smile.',
           '"Two heads are better than one," said {Name2}.', '"I know just the way," said {Name2}.']


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def tale(rng: random.Random) -> str:
    """One fable: a hero, a problem, a friend, one or two obstacles, an ending and its moral."""
    name, name2 = rng.sample(NAMES, 2)
    (kind, pro), (kind2, _) = rng.sample(KINDS, 2)
    sub, obj, pos = PRONOUNS[pro or rng.choice(["she", "he"])]
    title, whens, happened, wanted, ending = rng.choice(PROBLEMS)
    thing = rng.choice(THINGS)
    fill = dict(Name=name, Name2=name2, sub=sub, obj=obj, pos=pos, thing=thing, Thing=thing.title())
    f = lambda s: s.format(**fill)  # noqa: E731
    opening = rng.choice(["Once upon a time", "Long ago", "Not so long ago", "Many years ago"])
    sentences = [
        f"{opening}, {rng.choice(PLACES)}, there lived {_a(kind)} named {name}.",
        f"{name} was {rng.choice(TRAITS)}, and {sub} loved {rng.choice(LOVES)}.",
        f"Every morning, {sub} {f(rng.choice(ROUTINES))}.",
        f"One {rng.choice(whens)}, {f(happened)}.",
        f"{_cap(sub)} wanted to {f(wanted)}, but {sub} did not know how.",
        f(rng.choice(ASKS)),
        f"Just then, {_a(kind2)} named {name2} came along.",
        f(rng.choice(ANSWERS)),
    ]
    for link, (obstacle, fixes) in zip(rng.sample(LINKS, 2), rng.sample(OBSTACLES, rng.randint(1, 2))):
        sentences.append(f"{link}, {obstacle}. But {f(rng.choice(fixes))}.")
    sentences += [
        f"At last, {f(ending)}.",
        f'"Thank you, {name2}," said {name}. "I could not have done it without you."',
        f"From that day on, {name} and {name2} were the best of friends.",
        f"And so {name} learned that {rng.choice(MORALS)}.",
    ]
    return f"{name} and {f(title)}\n" + " ".join(sentences)


# -- recipes: dishes, ingredients and methods ---------------------------------------------------

DISHES = [  # (name, the four base ingredients {a}..{d}, its method)
    ("Soup", ["onion", "carrots", "celery", "vegetable stock"], "soup"),
    ("Stew", ["potatoes", "onion", "carrots", "chopped tomatoes"], "stew"),
    ("Bread", ["strong flour", "dried yeast", "warm water", "salt"], "bread"),
    ("Cake", ["self-raising flour", "butter", "caster sugar", "eggs"], "cake"),
    ("Salad", ["lettuce", "cucumber", "olive oil", "lemon"], "salad"),
    ("Pie", ["shortcrust pastry", "butter", "onion", "milk"], "pie"),
    ("Porridge", ["rolled oats", "milk", "water", "honey"], "porridge"),
    ("Pancakes", ["plain flour", "eggs", "milk", "butter"], "pancakes"),
]
AMOUNTS = {  # ingredient: the amounts it comes in
    "onion": ["1 onion", "1 large onion", "2 small onions"], "carrots": ["2 carrots", "3 carrots", "300g carrots"],
    "celery": ["1 stick of celery", "2 sticks of celery"], "vegetable stock": ["1 litre vegetable stock", "750ml vegetable stock"],
    "potatoes": ["500g potatoes", "4 medium potatoes"], "chopped tomatoes": ["1 tin of chopped tomatoes", "400g chopped tomatoes"],
    "strong flour": ["500g strong flour"], "dried yeast": ["7g dried yeast", "1 tsp dried yeast"],
    "warm water": ["300ml warm water", "320ml warm water"], "salt": ["1 tsp salt", "2 tsp salt"],
    "self-raising flour": ["200g self-raising flour", "225g self-raising flour"], "butter": ["50g butter", "100g butter", "200g butter"],
    "caster sugar": ["150g caster sugar", "200g caster sugar"], "eggs": ["2 eggs", "3 eggs", "4 eggs"],
    "lettuce": ["1 lettuce", "2 little gem lettuces"], "cucumber": ["half a cucumber", "1 cucumber"],
    "olive oil": ["2 tbsp olive oil", "3 tbsp olive oil"], "lemon": ["1 lemon", "half a lemon"],
    "shortcrust pastry": ["300g shortcrust pastry", "500g shortcrust pastry"], "milk": ["150ml milk", "300ml milk", "500ml milk"],
    "rolled oats": ["80g rolled oats", "100g rolled oats"], "water": ["200ml water", "250ml water"],
    "honey": ["1 tbsp honey", "2 tsp honey"], "plain flour": ["100g plain flour", "150g plain flour"],
}
FLAVOURS = {  # title word: (ingredient line, its name in the method)
    "Lemon": ("the zest of 1 lemon", "lemon zest"), "Mushroom": ("250g mushrooms", "mushrooms"),
    "Pumpkin": ("400g pumpkin", "pumpkin"), "Apple": ("2 apples", "apples"), "Leek": ("2 leeks", "leeks"),
    "Spinach": ("100g spinach", "spinach"), "Cheese": ("100g grated cheese", "cheese"), "Pea": ("200g peas", "peas"),
    "Ginger": ("1 tsp ground ginger", "ginger"), "Cinnamon": ("1 tsp cinnamon", "cinnamon"),
    "Herb": ("a handful of fresh herbs", "herbs"), "Walnut": ("50g walnuts", "walnuts"), "Pear": ("2 ripe pears", "pears"),
    "Bean": ("1 tin of white beans", "beans"), "Raisin": ("75g raisins", "raisins"), "Sweetcorn": ("200g sweetcorn", "sweetcorn"),
}
STYLES = ["Simple", "Country", "Winter", "Quick", "Grandmother's", "Harvest", "Sunday", "Spiced", "Summer", "Everyday"]
METHODS = {
    "soup": ["Chop the {a} and the {b} into small pieces.", "Warm a little oil in a large pan.",
             "Cook the {a} gently for {m} minutes until soft.", "Add the {b}, the {c} and the {f}.",
             "Pour in the {d} and bring to the boil.", "Simmer for {n} minutes, stirring now and then.",
             "Blend until smooth and season to taste."],
    "stew": ["Cut the {a} into chunks and slice the {b}.", "Soften the {b} in a heavy pot for {m} minutes.",
             "Add the {a}, the {c} and the {d}.", "Cover and cook over a low heat for {n} minutes.",
             "Stir in the {f} and cook for 5 minutes more."],
    "bread": ["Mix the {a} and the {b} in a large bowl.", "Add the {c} and the {d} and stir to a rough dough.",
              "Knead for {m} minutes until smooth and springy, then work in the {f}.",
              "Leave to rise for {n} minutes.", "Shape into a loaf and bake at {t} degrees for 30 minutes."],
    "cake": ["Heat the oven to {t} degrees.", "Beat the {b} and the {c} until pale.",
             "Beat in the {d}, then fold in the {a}.", "Stir in the {f}.",
             "Pour into a lined tin and bake for {n} minutes."],
    "salad": ["Wash the {a} and tear it into pieces.", "Slice the {b} thinly.",
              "Whisk the {c} with the juice of the {d}.", "Toss everything with the {f} and serve at once."],
    "pie": ["Heat the oven to {t} degrees.", "Soften the {c} in the {b} for {m} minutes.",
            "Add the {f} and the {d} and cook until thick.", "Line a dish with the {a} and pour in the filling.",
            "Bake for {n} minutes until golden."],
    "porridge": ["Put the {a}, the {b} and the {c} in a small pan.", "Bring to a simmer.",
                 "Cook for {m} minutes, stirring all the time.", "Top with the {f} and the {d}."],
    "pancakes": ["Whisk the {a}, the {b} and the {c} into a smooth batter.", "Rest the batter for {n} minutes.",
                 "Melt a little {d} in a frying pan.", "Pour in a ladle of batter and cook for {m} minutes on each side.",
                 "Serve with the {f}."],
}
TIPS = ["Keeps for two days in a cool place.", "Tastes even better the next day.",
        "Children love to help with this one.", "Serve with warm bread.", "Freezes well.",
        "Double the amounts for a crowd."]


def recipe(rng: random.Random) -> str:
    """One recipe: a title, servings and time, an ingredient list and numbered steps."""
    dish, base, method = rng.choice(DISHES)
    flavour = rng.choice(sorted(FLAVOURS))
    flavour_line, flavour_name = FLAVOURS[flavour]
    lines = [f"{rng.choice(STYLES)} {flavour} {dish}",
             f"Serves {rng.randint(2, 8)}. Takes {rng.choice([20, 30, 40, 45, 60, 90])} minutes.",
             "Ingredients:"]
    lines += [f"- {rng.choice(AMOUNTS[item])}" for item in base] + [f"- {flavour_line}", "Method:"]
    a, b, c, d = base
    fill = dict(a=a, b=b, c=c, d=d, f=flavour_name, m=rng.choice([3, 5, 8, 10]),
                n=rng.choice([15, 20, 25, 30, 40]), t=rng.choice([180, 190, 200, 220]))
    lines += [f"{i}. {step.format(**fill)}" for i, step in enumerate(METHODS[method], 1)]
    lines.append(f"Tip: {rng.choice(TIPS)}")
    return "\n".join(lines)


def build(kind: str) -> str:
    """The full text of corpus ``kind`` ("tales" or "recipes"), documents split by blank lines."""
    make, seed, count = (tale, TALES_SEED, TALES_COUNT) if kind == "tales" else (recipe, RECIPES_SEED, RECIPES_COUNT)
    rng = random.Random(seed)
    return "\n\n".join(make(rng) for _ in range(count)) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    args = parser.parse_args()
    stale = []
    for kind in ("tales", "recipes"):
        path, text = HERE / f"{kind}.txt", build(kind)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({len(text.encode()):,} bytes)")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python {Path(__file__).name})", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
