"""evals/anchors.py's TF-IDF logistic regression against scikit-learn's, on the demo's training and held-out reviews.

    pip install scikit-learn   # not a dependency of danlu: only this check needs it
    python -m docs.anchors_vs_sklearn

For the sentiment anchor (sft.jsonl's reviews) and the LoRA anchor (lora.jsonl's): the vocabulary size and the
largest difference of any TF-IDF feature on the held-out reviews against TfidfVectorizer(analyzer="char",
ngram_range=(1, 3)), then the largest difference of p(label) and the share of equal predictions against
LogisticRegression(), at its default tolerance (1e-4) and run to convergence (1e-10), with both accuracies.
docs/demo_experiments.md quotes its output.
"""

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

import eval_model
from dataset.formats import iter_records
from evals import lora_style, sentiment
from evals.anchors import TfidfLogisticRegression, labelled_turns, last_user_text


def main():
    sets = eval_model.load_eval_sets("dataset/demo", 300)

    cases = {
        "sentiment": (labelled_turns(iter_records("dataset/demo/sft.jsonl", "chat"), sentiment.review_of,
                                     sentiment.parse_sentiment_answer), sentiment.review_of, sets["sentiment"]),
        "lora": (labelled_turns(iter_records("dataset/demo/lora.jsonl", "chat"), lora_style.review_of,
                                lora_style.parse_verdict), lora_style.review_of, sets["lora"]),
    }
    for name, (train, text_of, records) in cases.items():
        texts, labels = zip(*train)
        test = [text_of(last_user_text(record)) for record in records]
        gold = [record["meta"]["label"] for record in records]
        ours = TfidfLogisticRegression(texts, labels)
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 3))
        x = vectorizer.fit_transform(texts)
        assert vectorizer.vocabulary_.keys() == ours.vocabulary.keys()
        columns = [vectorizer.vocabulary_[gram] for gram in ours.vocabulary]
        feature_diff = abs(ours.features(test).to_dense().numpy() - vectorizer.transform(test)[:, columns]).max()
        print(f"{name}: {len(train)} training reviews, {len(ours.vocabulary)} n-grams, largest feature difference "
              f"{feature_diff:.1e}")
        p_ours = ours.probability(test).numpy()
        predicted = ours.predict(test)
        for tol in (1e-4, 1e-10):
            sk = LogisticRegression(tol=tol, max_iter=10_000).fit(x, labels)
            p_sk = sk.predict_proba(vectorizer.transform(test))[:, list(sk.classes_).index(ours.classes[1])]
            sk_predicted = sk.predict(vectorizer.transform(test))
            print(f"  scikit-learn tol {tol:g} ({sk.n_iter_[0]} iterations): largest p difference "
                  f"{abs(p_sk - p_ours).max():.1e}, same label {np.mean(sk_predicted == np.array(predicted)):.3f}; "
                  f"accuracy scikit-learn {np.mean(sk_predicted == np.array(gold)):.4f}, "
                  f"anchors.py {np.mean(np.array(predicted) == np.array(gold)):.4f}")


if __name__ == "__main__":
    main()
