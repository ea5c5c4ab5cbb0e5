"""Word tables of the built-in demo corpus (names, places, templates, phrasings).

Data, not code: the generators in ``gs_ray.data.demo.corpus`` draw from these with seeded
``random.Random`` instances; editing a table changes the corpus for every seed.
"""

from __future__ import annotations

NAMES = (
    "Maya",
    "Liam",
    "Aisha",
    "Noah",
    "Sofia",
    "Ethan",
    "Priya",
    "Lucas",
    "Chloe",
    "Omar",
    "Hana",
    "Mateo",
    "Zoe",
    "Ravi",
    "Elena",
    "Kofi",
    "Ingrid",
    "Diego",
    "Mei",
    "Samuel",
    "Leila",
    "Tomas",
    "Amara",
    "Jonah",
    "Yuki",
    "Felix",
    "Nadia",
    "Arjun",
    "Grace",
    "Emeka",
    "Clara",
    "Hugo",
    "Fatima",
    "Oscar",
    "Lena",
    "Kenji",
    "Rosa",
    "Malik",
    "Ivy",
    "Pablo",
    "Sana",
    "Theo",
    "Beatriz",
    "Finn",
    "Anika",
    "Marcus",
    "Olga",
    "Tariq",
    "Julia",
    "Rohan",
)

ROLES = (
    "a baker",
    "a lighthouse keeper",
    "a librarian",
    "a young inventor",
    "a retired sailor",
    "a street musician",
    "a beekeeper",
    "a night-shift nurse",
    "a clockmaker",
    "a school teacher",
    "a mail carrier",
    "a gardener",
    "a taxi driver",
    "a museum guard",
    "a chef",
    "a painter",
    "a farmer",
    "a park ranger",
    "a bookseller",
    "a delivery cyclist",
    "a tailor",
    "a marine biologist",
    "a train conductor",
    "a potter",
    "a carpenter",
)

PLACES = (
    "a fishing village",
    "a busy city market",
    "a snowy mountain town",
    "an old train station",
    "a quiet seaside harbour",
    "a desert oasis",
    "a rainy suburb",
    "a floating market",
    "a forest cabin",
    "a small island village",
    "a rooftop garden",
    "an abandoned theatre",
    "a university library",
    "a riverside cafe",
    "a mountain monastery",
    "a bustling airport",
    "a lantern-lit alley",
    "a sleepy farming valley",
    "a canal-side neighbourhood",
    "a research station in the Arctic",
)

OBJECTS = (
    "a brass key",
    "an old map",
    "a cracked pocket watch",
    "a glowing pebble",
    "a bundle of letters",
    "a music box",
    "a red umbrella",
    "a torn photograph",
    "a wooden compass",
    "a jar of buttons",
    "a silver locket",
    "a notebook full of equations",
    "a paper kite",
    "a mysterious seed",
    "a tiny clockwork robot",
    "a forgotten diary",
    "a chipped teacup",
    "a postcard with no stamp",
    "a copper lantern",
    "a violin with three strings",
)

ANIMALS = (
    "fox",
    "tortoise",
    "crow",
    "hedgehog",
    "otter",
    "owl",
    "rabbit",
    "badger",
    "mouse",
    "heron",
    "goat",
    "squirrel",
    "bear cub",
    "frog",
    "sparrow",
    "wolf",
    "lamb",
    "beaver",
)

TIMES = (
    "One grey morning",
    "Late one evening",
    "On the first day of spring",
    "Just before midnight",
    "On a stormy afternoon",
    "Early one Sunday",
    "In the middle of winter",
    "On the hottest day of summer",
    "As the sun came up",
    "One foggy autumn night",
)

FEELINGS = (
    "curious",
    "nervous",
    "delighted",
    "puzzled",
    "hopeful",
    "restless",
    "determined",
    "homesick",
    "amused",
    "cautious",
)

WORDS = (
    "river",
    "apple",
    "quiet",
    "lantern",
    "orbit",
    "maple",
    "engine",
    "cloud",
    "tiger",
    "velvet",
    "harbor",
    "piano",
    "echo",
    "garden",
    "silver",
    "rocket",
    "meadow",
    "pixel",
    "canyon",
    "violet",
    "thunder",
    "ocean",
    "pepper",
    "marble",
    "window",
    "falcon",
    "candle",
    "summit",
    "island",
    "copper",
    "data",
    "bird",
    "sun",
    "tea",
    "map",
    "code",
    "blue",
    "moon",
)

COMPANIES = (
    "Northwind Tools",
    "Bluefin Foods",
    "Harbor Rail",
    "Cedar Health",
    "Lumen Software",
    "Atlas Freight",
    "Kestrel Energy",
    "Maple Retail",
    "Orion Robotics",
    "Summit Telecom",
)

SHOP_ITEMS = (
    ("notebooks", 2, 6),
    ("pens", 1, 4),
    ("apples", 1, 3),
    ("comic books", 3, 9),
    ("packs of stickers", 2, 5),
    ("candles", 3, 12),
    ("bags of rice", 4, 15),
    ("flower pots", 3, 10),
    ("tennis balls", 2, 6),
    ("jars of honey", 5, 14),
    ("loaves of bread", 2, 6),
    ("paintbrushes", 2, 8),
)

STORES = (
    "the corner shop",
    "a farmers' market",
    "the school fair",
    "a garden centre",
    "the bookstore",
    "a street market",
    "the hardware store",
)

MATH_ASKS = (
    "Solve the following word problem step by step.",
    "Answer this math question and show your reasoning.",
    "Work through the problem below and give the final answer.",
    "Please solve this problem, explaining each step.",
    "Show the calculation needed to answer this question.",
    "Solve this grade-school math problem.",
)

MATH_SUFFIXES = (
    " Show your work.",
    " Explain step by step.",
    " Give the final answer at the end.",
    "",
)

FIN_ASKS = (
    "Answer the following personal-finance question and show the calculation.",
    "Solve this finance problem step by step.",
    "Work out the numbers for the question below.",
    "Help with this money question; explain the calculation.",
)

RATES = (2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6, 7)

PALINDROMES = (
    "Never odd or even",
    "Step on no pets",
    "Was it a car or a cat I saw",
    "No lemon, no melon",
    "level",
    "racecar",
    "rotor",
    "Top spot",
    "A Santa at NASA",
)

CODE_ASKS = (
    "Write a Python function `{sig}` that {desc}.",
    "Implement `{sig}` in Python. It should {goal}.",
    "I need a Python helper named `{name}` to {goal}. Can you write it?",
    "Create a Python function called `{name}` which {desc}.",
    "Using only the standard library, write `{name}` so that it {desc}.",
    "Write Python code to {goal}. Wrap it in a function named `{name}`.",
)

FIN_CODE_ASKS = (
    "For a budgeting app, write a Python function `{sig}` that {desc}.",
    "Write a Python function named `{name}` to {goal}.",
    "Implement `{sig}` in Python; it should {goal}.",
    "I'm automating my spreadsheet. Give me a Python function `{name}` that {desc}.",
)

CODE_INTROS = (
    "Here is a simple implementation.",
    "Here's a straightforward solution.",
    "This version uses only built-in Python.",
    "One clean way to write it:",
    "Below is a short, readable implementation.",
    "Sure, here is the function.",
)

EXAMPLE_LINES = (
    "For example, `{call}` returns `{exp}`.",
    "Example: `{call}` returns `{exp}`.",
    "Quick check: `{call}` gives `{exp}`.",
)

HIDDEN = (
    "half-buried in the sand",
    "wedged behind a loose brick",
    "tucked inside a returned book",
    "lying on an empty bench",
    "tangled in a fishing net",
    "at the bottom of a drawer",
    "under a pile of autumn leaves",
    "on the top step of the stairs",
)

MAGIC = (
    "began to hum a tune nobody had heard in years",
    "glowed faintly in the dark",
    "pointed stubbornly towards the north",
    "was warm again by morning",
    "showed a different picture every hour",
)

CLUES = (
    "muddy paw prints",
    "sawdust",
    "drops of blue paint",
    "grains of sugar",
    "pine needles",
    "wet footprints",
    "a single red thread",
)

PLANETS = (
    "Kepler-9b",
    "a frozen moon of Saturn",
    "the red dunes of Mars",
    "Tau Ceti e",
    "a drifting comet",
    "the ocean world Thalassa",
)

SHIPS = ("Meridian", "Halcyon", "Wayfarer", "Lodestar", "Perihelion", "Quiet Tide")

SEASONS = ("spring", "summer", "autumn", "winter")

FIRST_LINES = (
    "The clock in the square had not struck thirteen in a hundred years.",
    "Nobody ever answered the phone in the empty shop, until today.",
    "The letter arrived forty years late.",
    "On the morning the river ran backwards, {n} was the only one awake.",
    "Every door in {p} had a number except one.",
    "The last train of the night stopped where there was no station.",
)

# Virtue, flaw, event (with {a}/{a2}), moral.
FABLES = (
    (
        "patience",
        "wanted everything done at once",
        "The {a} planted a seed and dug it up every morning to check on it, until {an_a2} "
        "explained that roots grow in the dark.",
        "Good things grow in their own time.",
    ),
    (
        "honesty",
        "told small lies to stay out of trouble",
        "When the {a} cried for help at the flooded bank, the {a2} remembered the lies and did "
        "not come at first.",
        "A single truth is lighter to carry than a hundred lies.",
    ),
    (
        "generosity",
        "kept every berry for itself",
        "A hard frost came, and the {a}'s hoard froze solid, but the {a2} it had once refused "
        "shared a warm meal anyway.",
        "What we share comes back to us.",
    ),
    (
        "humility",
        "boasted about being the cleverest creature in the wood",
        "The {a} tried to cross the river on a rotten log to prove it, and the quiet {a2} had "
        "to pull it out.",
        "Wisdom listens more than it speaks.",
    ),
    (
        "courage",
        "was afraid of the dark river",
        "When the {a2}'s little one was swept towards the rapids, the {a} swam in without "
        "stopping to think.",
        "Courage is fear that keeps walking.",
    ),
    (
        "teamwork",
        "insisted on doing every task alone",
        "The {a} tried to roll a heavy stone from the burrow for three days, until the {a2} "
        "and its cousins pushed together.",
        "Many paws make light work.",
    ),
    (
        "perseverance",
        "gave up whenever something became hard",
        "The {a} watched {an_a2} fail to build a dam eleven times and succeed on the twelfth.",
        "Slow and steady effort wins in the end.",
    ),
)

# Each family: (groups, slots). A group pairs instructions with the openings that fit them; after
# the opening, one alternative is drawn from every slot.
StoryFamily = tuple[
    tuple[tuple[tuple[str, ...], tuple[str, ...]], ...], tuple[tuple[str, ...], ...]
]

STORY_FAMILIES: tuple[StoryFamily, ...] = (
    (  # discovery
        (
            (
                (
                    "Write a short story about {n}, {r} who finds {o} in {p}.",
                    "Tell a brief story in which {n}, {r}, discovers {o} in {p}.",
                    "Write a piece of flash fiction: {r} named {n} stumbles upon {o} in {p}.",
                ),
                (
                    "{t}, {n}, {r} in {p}, found {o} {hidden}.",
                    "{n} had worked as {r} in {p} for years, but {tl} was the first time {n} found {o} "
                    "{hidden}.",
                ),
            ),
        ),
        (
            (
                "It felt oddly warm, as if someone had held it a moment ago.",
                "{n} felt {f} and turned it over twice, looking for a name.",
                "A scrap of paper tied to it read: 'Return me where the river bends.'",
                "Nobody nearby had lost it, which made {n} even more {f}.",
            ),
            (
                "By evening {n} had asked half the neighbourhood, and an old {r2} finally recognised it.",
                "{n} showed it to {n2}, who went pale and said it had been missing for forty years.",
                "That night {ot} {magic}.",
                "Following a faded mark on its side, {n} walked to the edge of town and knocked on "
                "an unfamiliar door.",
            ),
            (
                "In the end {ot} found its way home, and {n} gained an unexpected friend.",
                "{n} decided to keep {ot} safe until its owner came looking, and the waiting became "
                "its own small adventure.",
                "When its owner, {n2}, finally held it again, tears and laughter came together.",
                "{n} never learned the whole story, but from then on every walk felt like a search.",
            ),
        ),
    ),
    (  # mystery
        (
            (
                (
                    "Write a short mystery story in which {ot} goes missing from {p}.",
                    "Write a cozy whodunit: {n}, {r}, must find out who took {ot} from {p}.",
                    "Tell a brief detective story set in {p} about a missing {ob}.",
                ),
                (
                    "{t}, {ot} vanished from its shelf in {p}.",
                    "Nobody in {p} could explain how {ot} had disappeared overnight.",
                ),
            ),
        ),
        (
            (
                "{n}, {r} with a sharp eye, started asking questions.",
                "{n}, {r} by day and a puzzle lover by night, took a notebook and began to investigate.",
            ),
            (
                "The only clue was a trail of {clue} leading to the back door.",
                "A window had been left open, and there were {clue} on the sill.",
                "Someone had left {clue} under the table where it used to stand.",
            ),
            (
                "Suspicion fell on {n2}, who had admired {ot} for weeks.",
                "Everyone blamed the new {r2}, who had arrived only the day before.",
            ),
            (
                "But the culprit turned out to be {an_a} building a nest from shiny things.",
                "In the end {n2} confessed to borrowing it for a surprise and meaning to return it.",
                "The truth was simpler: {ot} had been moved for cleaning and put in the wrong cupboard.",
            ),
            (
                "{n} laughed, closed the notebook and went home for tea.",
                "From then on, {ot} was kept in plain sight, and {p} slept easier.",
            ),
        ),
    ),
    (  # fable
        (
            (
                (
                    "Write a short fable about {an_a} that teaches a lesson about {virtue}.",
                    "Tell an animal fable with a moral about {virtue}. The hero should be {an_a}.",
                    "Write a fable for children featuring {an_a} and {an_a2}, with a moral about {virtue}.",
                ),
                (
                    "Once, at the edge of a {habitat}, there lived {an_a} who {flaw}.",
                    "Long ago, in a {habitat}, a young {a} {flaw}.",
                ),
            ),
        ),
        (
            ("{event}",),
            (
                "From that day on, the {a} changed its ways.",
                "The {a} was quiet for a long time, and then it said thank you.",
                "Ashamed and grateful, the {a} promised to do better.",
            ),
            ("Moral: {moral}", "And so the {a} learned: {moral}"),
        ),
    ),
    (  # science fiction
        (
            (
                ("Write a short science-fiction story about {n}, a pilot stranded on {planet}.",),
                (
                    "{n} had been alone on {planet} for {k} days when the radio crackled.",
                    "Stranded on {planet}, {n} had almost stopped listening to the radio, until today.",
                ),
            ),
            (
                (
                    "Write a sci-fi micro-story set aboard the starship {ship}.",
                    "Tell a short space story in which the crew of the {ship} receives a strange signal.",
                ),
                (
                    "The {ship} drifted above {planet} with one engine dark and {n} at the controls.",
                    "Aboard the starship {ship}, {n} was the only one awake when the console lit up.",
                    "The crew of the {ship} had been asleep for {k} days when {n} heard the signal.",
                ),
            ),
        ),
        (
            (
                "The signal repeated a simple pattern: three short pulses, then silence.",
                "A voice, thin and patient, asked for {n} by name.",
                "The sensors showed a structure nearby that had not been there the day before.",
            ),
            (
                "{n} checked the oxygen, counted {h} hours of reserve and decided to answer.",
                "Against every rule in the manual, {n} steered towards the source.",
            ),
            (
                "It was a rescue beacon, built by a crew who had waited years for someone to pass.",
                "It was {n2}, a friend from flight school, lost on a mission everyone had forgotten.",
                "It was the ship's own echo from a future that had already gone wrong.",
            ),
            (
                "That night, for the first time in a long while, {n} did not feel alone.",
                "{n} logged the contact and set a course for home, carrying two voices instead of one.",
            ),
        ),
    ),
    (  # bedtime
        (
            (
                ("Write a gentle bedtime story about a sleepy {a} who cannot find {ot}.",),
                (
                    "In {p}, when the lamps were low, a little {a} was searching for {ot}, which it "
                    "always held at bedtime.",
                    "It was bedtime in {p}, but a small {a} could not sleep without {ot}, and {ot} was "
                    "nowhere to be seen.",
                ),
            ),
            (
                (
                    "Tell a calm bedtime story for a five-year-old about {an_a} and the moon.",
                    "Write a short, soothing bedtime story about {an_a} in {p}.",
                ),
                (
                    "The moon rose over {p}, round and silver, and a small {a} was still awake.",
                    "In {p}, when the lamps were low, a little {a} wanted to say goodnight to the moon.",
                ),
            ),
        ),
        (
            (
                "A kind old {a2} came to keep it company.",
                "The moon leaned closer and lit the path with a soft glow.",
            ),
            (
                "Everything it needed was close by, right where it belonged.",
                "One by one, the stars winked down, as if they were sleepy too.",
            ),
            (
                "The little {a} curled up, warm and safe, and drifted into dreams.",
                "And with a tiny smile, the {a} closed its eyes. Goodnight, little {a}.",
            ),
        ),
    ),
    (  # diary
        (
            (
                (
                    "Write a diary entry from the point of view of {n}, {r}, after a surprising day.",
                    "Write a short journal entry by {n}, {r} in {p}, describing an unusual encounter.",
                ),
                (
                    "Dear diary, today did not go as planned.",
                    "Dear diary, I am still {f} as I write this.",
                ),
            ),
        ),
        (
            (
                "I was doing my usual rounds as {r} in {p} when {n2} appeared with {o}.",
                "{t}, a stranger stopped me in {p} and asked if I had ever seen {o}.",
            ),
            (
                "I said no, but then I remembered the one I saw {hidden} years ago.",
                "We spent the afternoon following directions that made less sense the further we went.",
            ),
            (
                "By sunset we had found it, and I have rarely seen anyone so relieved.",
                "We never found it, yet I think we both found something better: a friend.",
            ),
            (
                "I will sleep well tonight. - {n}",
                "Tomorrow I will look at {p} with new eyes. - {n}",
            ),
        ),
    ),
    (  # dialogue
        (
            (
                (
                    "Write a short scene, mostly dialogue, between {n} and {n2} in {p}.",
                    "Write a brief conversation-driven story where {n} asks {n2} for {o}.",
                ),
                (
                    '"You\'re late," said {n}, without looking up.',
                    '"Did you bring it?" {n} whispered as {n2} sat down.',
                ),
            ),
        ),
        (
            (
                '"I brought {o}," {n2} said. "That\'s what you asked for, isn\'t it?"',
                '"Only {o}, and a very long story," {n2} replied.',
            ),
            (
                '"It\'s exactly what I needed. It belonged to my grandmother," said {n}.',
                '"Then we still have a chance," {n} said, eyes bright.',
            ),
            (
                "They talked until the lights of {p} came on, planning the next step.",
                "Outside, the rain stopped, as if it had been listening.",
            ),
            (
                '"Same time tomorrow?" asked {n2}. "Same time," said {n}, smiling.',
                "Neither of them noticed the {a} watching from the doorway.",
            ),
        ),
    ),
    (  # twist ending
        (
            (
                ("Write a very short story with a twist ending about {n} and {ot}.",),
                (
                    "For thirty years, {n} had kept {ot} locked away in {p}.",
                    "Everyone in {p} knew that {n} never let {ot} out of sight.",
                ),
            ),
            (
                ("Write a story that ends with a surprise: {r} waits for a visitor in {p}.",),
                (
                    "{n}, {r}, waited in {p} all afternoon for a visitor who had promised to bring {o}.",
                    "{n}, {r}, had set two cups on the table in {p} and was waiting for a visitor.",
                ),
            ),
        ),
        (
            (
                "{n} felt {f}, though nobody could have said why.",
                "Neighbours whispered about it, but {n} only smiled.",
            ),
            (
                "As the light faded, there was a knock at the door.",
                "At exactly midnight, the old floorboards creaked.",
            ),
            (
                "It was {n} -- or rather, a much younger {n}, holding the very same {ob}.",
                "The visitor had been there the whole time: it was the {a} from the garden.",
                "On the step lay an envelope with a note in {n}'s own handwriting, dated tomorrow.",
            ),
        ),
    ),
    (  # first line given
        (
            (
                (
                    'Write a short story that begins with the sentence: "{first}"',
                    'Continue this opening line into a complete short story: "{first}"',
                ),
                ("{first}",),
            ),
        ),
        (
            (
                "{n}, {r}, noticed it first and felt {f}.",
                "In {p}, people pretended not to notice, but {n} could not.",
            ),
            (
                "{n} followed a faint sound through the streets until it led to {o} {hidden}.",
                "Together with {n2}, {n} searched until they found {o} {hidden}.",
            ),
            (
                "When {n} touched it, {ot} {magic}.",
                "There was a message carved on it, addressed to {n} by name.",
            ),
            (
                "By morning everything looked normal again, except that {n} could not stop smiling.",
                "{n} kept the secret, and {p} never quite felt ordinary again.",
            ),
        ),
    ),
    (  # reunion
        (
            (
                (
                    "Write a short story about two old friends, {n} and {n2}, meeting again in {p}.",
                    "Tell a heartwarming story about a reunion in {p}.",
                ),
                (
                    "{n} had not seen {n2} since they were children in {p}.",
                    "After twenty years abroad, {n2} came back to {p} and found {n} waiting.",
                ),
            ),
        ),
        (
            (
                "At first neither knew what to say, so they laughed instead.",
                "{n} was {f}; {n2} was holding {o}, the one they had shared as kids.",
            ),
            (
                "They walked the old streets, pointing at shops that were gone and trees that had grown.",
                "Over tea they traded stories, and the years folded up like a map.",
            ),
            (
                "Before parting, they made a promise to meet every {season}.",
                "They agreed that some friendships only pause; they never end.",
            ),
        ),
    ),
    (  # quest
        (
            (
                ("Write a short fairy tale about {n}, who must carry {o} to a faraway queen.",),
                (
                    "Long ago, in {p}, lived {n}, {r} with more courage than money, who was asked to "
                    "carry {o} to the old queen beyond the mountains.",
                ),
            ),
            (
                ("Write a quest story in which {n} sets out from {p} to find {o}.",),
                (
                    "When the wells of {p} ran dry, {n} set out to find {o}, the only thing that could "
                    "break the drought.",
                    "A wise {a} told {n} that only {o} could save {p}, so {n} packed a bag and set out.",
                ),
            ),
        ),
        (
            (
                "On the way, {n} shared bread with a hungry {a2}, who later showed a secret pass.",
                "Three trials stood in the way: a river, a riddle and a storm.",
            ),
            (
                "At the journey's end, {n} understood that the treasure was the help found on the way.",
                "When {ot} finally reached its destination, bells rang out across the land.",
            ),
            (
                "{n} returned home a hero, though {n} only ever called it a long walk.",
                "And in {p} they still tell the story every {season}.",
            ),
        ),
    ),
    (  # object point of view
        (
            (
                (
                    "Write a short story told from the point of view of {o}.",
                    "Imagine you are {o} in {p}. Tell your story in the first person.",
                ),
                (
                    "I am {o}, and I have lived in {p} longer than anyone remembers.",
                    "Nobody notices me; I am just {o} sitting in {p}.",
                ),
            ),
        ),
        (
            (
                "People pass me every day, busy and {f}, hardly looking.",
                "I have heard a thousand secrets and kept every one.",
            ),
            (
                "Then {n}, {r}, picked me up and held me up to the light.",
                "One day a child named {n} asked what my story was.",
            ),
            (
                "For the first time in years, I felt useful again.",
                "I could not answer, of course, but I think {n} understood.",
            ),
            (
                "Now I travel in {n}'s pocket, and every day is new.",
                "Tonight I rest on a windowsill, watching {p} fall asleep.",
            ),
        ),
    ),
    (  # seasonal vignette
        (
            (
                (
                    "Write a short descriptive story about a {season} day in {p}.",
                    "Describe a single {season} afternoon in {p} through the eyes of {n}, {r}.",
                ),
                (
                    "It was {season} in {p}, and the air smelled of rain and woodsmoke.",
                    "{season_cap} arrived in {p} all at once, the way it always did.",
                ),
            ),
        ),
        (
            (
                "{n}, {r}, opened the shutters and watched the street wake up.",
                "{n}, {r}, walked the long way to work just to see the light on the water.",
            ),
            (
                "{Aan_a} crossed the road as if it owned it, and nobody argued.",
                "Children chased {ot} down the hill, shrieking with joy.",
            ),
            (
                "By evening the sky turned the colour of apricots.",
                "When the wind dropped, everything went quiet, as if holding its breath.",
            ),
            (
                "{n} decided it was, all things considered, a very good day.",
                "{n} wrote it down, so that one day in {season} would never be forgotten.",
            ),
        ),
    ),
)

STORY_SUFFIXES = (
    "",
    "",
    " Keep it short.",
    " Keep it under 150 words.",
    " Use vivid but simple language.",
    " Aim for one paragraph.",
)

HABITATS = ("pine forest", "marsh", "meadow", "river valley", "hillside", "birch wood")

PRODUCTS = (
    "pair of running shoes",
    "coffee grinder",
    "desk lamp",
    "wireless headset",
    "yoga mat",
    "hiking backpack",
    "blender",
    "winter jacket",
    "phone case",
    "set of kitchen knives",
    "board game",
    "smart watch",
    "electric kettle",
    "bluetooth speaker",
)

AGENTS = ("Alex", "Jordan", "Sam", "Taylor", "Robin", "Casey", "Morgan", "Jamie", "Riley")

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")

SUPPORT_ASKS = (
    "Reply to the following customer support ticket.",
    "Write a polite, helpful response to this customer message.",
    "You are a support agent. Resolve the ticket below.",
    "Draft a reply to this ticket that solves the customer's problem.",
    "Respond to the customer below in a friendly, professional tone.",
)

GREETINGS = ("Hi {c},", "Hello {c},", "Dear {c},")

SIGNOFFS = (
    "Best regards,\n{agent}, Customer Support",
    "Kind regards,\n{agent}",
    "Thanks again for your patience,\n{agent} from the support team",
)

SUPPORT_FAMILIES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (  # late delivery
        (
            "Hi, I ordered a {prod} (order {oid}) {d} days ago and it still hasn't arrived. Tracking "
            "hasn't changed since {day}. What's going on? - {c}",
            "Where is my order {oid}? The {prod} was due on {day} and I need it this week. {c}",
        ),
        (
            "I'm sorry your {prod} is late. I checked order {oid}: the parcel is held at a regional "
            "depot after a sorting delay. I've asked the carrier to prioritise it, and it should "
            "arrive within {d2} business days. I've also refunded your {fee} shipping fee.",
            "Thanks for your patience, and sorry for the wait. Order {oid} was scanned at the local "
            "hub on {day} but missed the delivery run. If it hasn't reached you by {day2}, reply "
            "here and I'll send a replacement {prod} at no cost.",
        ),
    ),
    (  # damaged item
        (
            "My {prod} from order {oid} arrived with a {damage}. I'm really disappointed. {c}",
            "Hello, order {oid} came today but the {prod} has a {damage}. Can I get a new one? - {c}",
        ),
        (
            "I'm very sorry the {prod} arrived with a {damage}. I've shipped a replacement today "
            "at no charge, and you'll get tracking for it by email. There's no need to return "
            "the damaged one; please recycle it.",
            "Thank you for letting us know, and sorry about the {damage}. I've issued a full "
            "refund of {amount} for order {oid}; it will appear on your statement within {d2} "
            "business days. If you'd prefer a replacement instead, just reply and I'll arrange it.",
        ),
    ),
    (  # refund status
        (
            "I returned a {prod} {d} days ago but I still haven't received my refund of {amount}. "
            "Order {oid}. - {c}",
            "Hi, what's the status of my refund for order {oid}? It was {amount}. Thanks, {c}",
        ),
        (
            "Thanks for checking in. Your return for order {oid} reached our warehouse on {day}, "
            "and I've just approved the refund of {amount}. Banks usually take {d2} business days "
            "to show it; your reference is RF-{ref}.",
            "Sorry for the delay. The return was received, but the refund was stuck in review. I've "
            "released it now: {amount} is on its way to your original payment method and should "
            "arrive within {d2} business days (reference RF-{ref}).",
        ),
    ),
    (  # double charge
        (
            "I was charged twice for order {oid}, {amount} each time. Please fix this. {c}",
            "Hello, my card shows two payments of {amount} for the same order ({oid}). - {c}",
        ),
        (
            "I'm sorry for the worry. I checked order {oid}: one of the two {amount} charges is a "
            "temporary authorisation hold, not a real payment. It will drop off automatically "
            "within {d2} business days. If it is still there after that, reply and I'll escalate it.",
            "You're right, and I apologise: order {oid} was charged twice because of a payment "
            "retry. I've refunded the duplicate {amount} today (reference RF-{ref}); it should "
            "appear within {d2} business days.",
        ),
    ),
    (  # password reset
        (
            "I can't log in and the password reset email never arrives. My account email is "
            "{email}. {c}",
            "Locked out of my account ({email}) after too many attempts. Help! - {c}",
        ),
        (
            "Sorry you're locked out. I've unlocked the account for {email} and sent a fresh reset "
            "link, valid for 30 minutes. If you don't see it, check your spam folder and add our "
            "address to your contacts. Once you're in, consider turning on two-step verification.",
            "Thanks for reaching out. Our reset emails to {email} were being blocked by your mail "
            "provider. I've sent a new link from a different server just now; it expires in one "
            "hour. If it still doesn't arrive, reply and we'll verify you another way.",
        ),
    ),
    (  # cancel subscription
        (
            "Please cancel my {plan} subscription before it renews on {day}. - {c}",
            "I'd like to stop my {plan} plan. How do I cancel? {c}",
        ),
        (
            "Done: your {plan} subscription is cancelled and will not renew. You keep full access "
            "until the end of the current billing period, and there will be no further charges. "
            "Your confirmation number is CX-{ref}.",
            "I've cancelled the {plan} plan for you. You won't be charged again, and your saved "
            "data stays available for {d2} months in case you change your mind. Confirmation: "
            "CX-{ref}.",
        ),
    ),
    (  # wrong size
        (
            "The {garment} in order {oid} is size {size}, but I need {size2}. Can I swap it? {c}",
            "Hi, I ordered the wrong size {garment} ({size}). Could I exchange it for a {size2}? {c}",
        ),
        (
            "Of course! I've set up an exchange for order {oid}: a prepaid return label is in your "
            "inbox, and a size {size2} {garment} is reserved for you. It ships as soon as the "
            "carrier scans the return.",
            "Happy to help. I've shipped the {garment} in size {size2} today so you don't have to "
            "wait, and emailed a free return label for the size {size}. Please send it back within "
            "{d2} weeks.",
        ),
    ),
    (  # app crash
        (
            "Your app crashes every time I open the {screen} screen on my {device}. {c}",
            "The app keeps closing when I tap {screen}. Using a {device}. Please fix! - {c}",
        ),
        (
            "Thanks for the report, and sorry for the trouble. This is a known issue in the last "
            "update. Please install version {ver}, which fixes the {screen} crash; if it persists, "
            "clear the app cache and sign in again. I've logged your {device} details as BUG-{ref}.",
            "Sorry about the crashes. Until the fix ships next week, you can reach {screen} from "
            "the website. I've added your {device} to bug BUG-{ref}, and we'll email you as "
            "soon as version {ver} is available.",
        ),
    ),
    (  # change address
        (
            "I just placed order {oid} and used my old address. Can you change it to {addr}? {c}",
            "Please update the delivery address on order {oid} to {addr}. Thanks, {c}",
        ),
        (
            "Good timing: order {oid} hadn't shipped yet, so I've changed the delivery address to "
            "{addr}. You'll get an updated confirmation email shortly.",
            "I've updated order {oid} to ship to {addr}. The parcel was already packed, so "
            "delivery may take {d2} extra days; I've refunded the shipping fee of {fee} for the "
            "trouble.",
        ),
    ),
    (  # promo code
        (
            "The code {code} doesn't work at checkout for my {prod}. It says invalid. - {c}",
            "Why won't {code} apply to my cart? I'm buying a {prod}. {c}",
        ),
        (
            "Sorry for the confusion. {code} only applies to orders over {min_spend}, which is why "
            "it was rejected. As a goodwill gesture I've applied the discount to your cart "
            "manually; it's valid for the next 48 hours.",
            "Thanks for flagging this. {code} expired on {day}, but since the email you received "
            "didn't say so, I've added a {pct}% credit to your account that you can use on the "
            "{prod} at checkout.",
        ),
    ),
    (  # missing item
        (
            "Order {oid} arrived, but the {prod} was missing from the box. {c}",
            "Hi, my parcel for {oid} only had part of my order: no {prod}. - {c}",
        ),
        (
            "I'm sorry about that. The {prod} from order {oid} was packed separately and is "
            "still in transit; it should arrive within {d2} business days. Here's its tracking "
            "number: TRK{ref}.",
            "Apologies for the mix-up. I've confirmed the {prod} was left out at our warehouse, "
            "so I've sent it by express delivery today at no cost. You'll receive tracking "
            "details within the hour.",
        ),
    ),
)

MATH_STORY_ASKS = (
    "Turn this word problem into a short story and weave the solution into it.",
    "Write a short story in which the character solves the problem below; show the working.",
    "Tell this math problem as a little story, solving it step by step along the way.",
)

STORY_OPENERS = (
    "{t}, {n}, {r} in {p}, had a puzzle to solve.",
    "Nobody in {p} was better with numbers than {n}, {r} by trade.",
    "{t}, {n} sat down at the kitchen table in {p} with a pencil and a cup of tea.",
    "{n} was {r} in {p}, and today the numbers would not leave {n} alone.",
)

STORY_THOUGHTS = (
    "{n} wondered: {q}",
    "The question on {n}'s mind was simple. {q}",
    '"{q}" {n} asked out loud.',
)

STORY_CLOSINGS = (
    "{n} smiled and wrote down the result: {a} {u}.",
    "With that settled, {n} circled {a} {u} in the notebook and went back to work.",
    "{n} checked it twice, and it still came out as {a} {u}.",
)
