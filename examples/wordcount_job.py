"""A confidential word count for `confide flow run` (see the README's dataflow section).

The top-level functions run inside the enclave workers' sandbox, from the sealed job description;
`job` runs on your machine, only to build the job."""


def words(line):
    return line.lower().split()


def one(word):
    return (word, 1)


def add(a, b):
    return a + b


def by_count(pair):
    return (-pair[1], pair[0])


def job(flow, inputs):
    counts = flow.text(inputs["text"]).flat_map(words).map(one).reduce_by_key(add)
    return counts.sort_by(by_count).save("word_counts")
