// N-gram next-token tables for the STAND and ADED drafters.
//
// A table maps the hash of a context n-gram (orders 1..max_order) to a small
// distribution over next tokens: at most `width` (token, mass) pairs, kept
// sorted by mass. What the mass means is the drafter's business:
//   * STAND adds the target model's probabilities at every verified position
//     (its top-k log-probabilities from the verification pass; a one-hot vector
//     when only the token is known);
//   * ADED adds counts with exponential forgetting (an adaptive tri-gram matrix)
//     and records, per (context, token), how often a drafted token was accepted.
// Drafting grows a tree best first from the longest context n-gram known at
// each node; children are chosen deterministically by mass, or stochastically
// with Gumbel-top-k (STAND under sampling).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <queue>
#include <random>
#include <tuple>
#include <vector>

namespace qd {

struct NextToken {
  int32_t token;
  float mass;
  float drafted;   // ADED: times this token was drafted from this context
  float accepted;  // ADED: times it was accepted
};

struct NgramEntry {
  std::vector<NextToken> next;  // sorted by mass, descending
  float total = 0;
};

struct TreeOut {
  std::vector<int32_t> tokens;
  std::vector<int32_t> parents;
  std::vector<double> probs;
};

class NgramTable {
 public:
  NgramTable(int max_order, int width, int64_t max_entries)
      : max_order_(max_order), width_(width), max_entries_(max_entries) {
    pow_.assign(max_order_ + 1, 1);
    for (int k = 1; k <= max_order_; ++k) pow_[k] = pow_[k - 1] * 0x9E3779B97F4A7C15ULL;
  }

  int max_order() const { return max_order_; }
  int64_t entries() const { return static_cast<int64_t>(entries_.size()); }

  // The entries' candidate lists are estimated from at most 4096 of them, spread over the table:
  // walking millions would hold up the caller (a metrics scrape on the proxy's event loop).
  size_t memory_bytes() const {
    size_t total = entries_.capacity() * sizeof(NgramEntry) + index_.slots.capacity() * sizeof(index_.slots[0]);
    const size_t n = entries_.size();
    if (n == 0) return total;
    const size_t stride = std::max<size_t>(1, n / 4096);
    size_t sampled = 0, lists = 0;
    for (size_t i = 0; i < n; i += stride, ++sampled) lists += entries_[i].next.capacity() * sizeof(NextToken);
    return total + lists * n / sampled;
  }

  // Add `mass[i]` to `tokens[i]` after every context order; `forget` < 1 first
  // scales the entry's old masses (adaptive tables).
  void observe(const int32_t* ctx, int64_t ctx_len, const int32_t* tokens, const float* mass, int k,
               float forget) {
    for (int n = 1; n <= max_order_ && n <= ctx_len; ++n) {
      NgramEntry& e = entry_for(key(ctx + ctx_len - n, n));
      if (forget < 1.0f) {
        for (auto& nt : e.next) nt.mass *= forget;
        e.total *= forget;
      }
      for (int i = 0; i < k; ++i) add(e, tokens[i], mass[i]);
    }
  }

  // ADED feedback: a token drafted after `ctx` was (or was not) accepted.
  void feedback(const int32_t* ctx, int64_t ctx_len, int32_t token, bool accepted) {
    for (int n = std::min<int64_t>(max_order_, ctx_len); n >= 1; --n) {
      int32_t at = index_.find(key(ctx + ctx_len - n, n));
      if (at >= 0 && entries_[at].total > 0) return credit(entries_[at], token, accepted);
    }
  }

  // Learn a run of tokens that followed `ctx`: position i is known through
  // `k` candidate tokens with masses (top_ids[i*k ...], mass[i*k ...]); the
  // context advances by the run's own tokens.
  void observe_run(std::vector<int32_t> ctx, const std::vector<int32_t>& run, const std::vector<int32_t>& top_ids,
                   const std::vector<float>& mass, int k, float forget) {
    for (size_t i = 0; i < run.size(); ++i) {
      if (k > 0 && top_ids.size() >= (i + 1) * k) {
        observe(ctx.data(), static_cast<int64_t>(ctx.size()), top_ids.data() + i * k, mass.data() + i * k, k, forget);
      } else {
        float one = 1.0f;
        observe(ctx.data(), static_cast<int64_t>(ctx.size()), &run[i], &one, 1, forget);
      }
      ctx.push_back(run[i]);
      if (static_cast<int>(ctx.size()) > max_order_) ctx.erase(ctx.begin());
    }
  }

 private:
  static void credit(NgramEntry& e, int32_t token, bool accepted) {
    for (auto& nt : e.next)
      if (nt.token == token) {
        nt.drafted += 1;
        if (accepted) nt.accepted += 1;
        return;
      }
  }

 public:

  // The distribution after the longest known suffix of ctx (nullptr if none).
  const NgramEntry* longest(const int32_t* ctx, int64_t ctx_len) const {
    for (int n = std::min<int64_t>(max_order_, ctx_len); n >= 1; --n) {
      const NgramEntry* e = lookup(key(ctx + ctx_len - n, n));
      if (e != nullptr && e->total > 0) return e;
    }
    return nullptr;
  }

  // Grow a draft tree. `score` maps (entry, next token) to an unnormalised
  // weight; children's probabilities are their weights over the entry's total
  // weight. With gumbel_temperature > 0, each node keeps at most `branch`
  // children sampled without replacement (Gumbel-top-k) instead of the heaviest,
  // and the tree grows in the order of the perturbed log-probabilities, so a
  // small budget follows what the target is likely to sample, not only its mode.
  template <typename Score>
  TreeOut grow(const int32_t* ctx, int64_t ctx_len, int budget, int max_depth, double min_prob, int branch,
               double gumbel_temperature, uint64_t seed, Score score) const {
    TreeOut out;
    if (budget <= 0 || ctx_len <= 0) return out;
    std::mt19937_64 rng(seed);
    struct Item {
      double key;   // log-probability, Gumbel-perturbed when sampling: the growth order
      double prob;
      int32_t serial;
      int32_t token;
      int32_t parent;
      int depth;
      bool operator<(const Item& o) const { return key < o.key || (key == o.key && serial > o.serial); }
    };
    std::priority_queue<Item> heap;
    int32_t serial = 0;
    std::vector<int32_t> path;  // scratch: context tail + path to a node
    auto expand = [&](int32_t parent, double parent_prob, double parent_key, int depth) {
      // Context of the node: the last max_order tokens of ctx + path to it.
      path.clear();
      std::vector<int32_t> rev;
      for (int32_t v = parent; v >= 0 && static_cast<int>(rev.size()) < max_order_; v = out.parents[v])
        rev.push_back(out.tokens[v]);
      int64_t need = max_order_ - static_cast<int64_t>(rev.size());
      for (int64_t i = std::max<int64_t>(0, ctx_len - need); i < ctx_len; ++i) path.push_back(ctx[i]);
      for (auto it = rev.rbegin(); it != rev.rend(); ++it) path.push_back(*it);
      const NgramEntry* e = longest(path.data(), static_cast<int64_t>(path.size()));
      if (e == nullptr) return;
      std::vector<std::pair<double, int32_t>> weights;
      double total = 0;
      for (const auto& nt : e->next) {
        double w = score(*e, nt);
        if (w <= 0) continue;
        weights.push_back({w, nt.token});
        total += w;
      }
      if (total <= 0) return;
      // (key offset, weight, token) of the children kept.
      std::vector<std::tuple<double, double, int32_t>> chosen;
      if (gumbel_temperature > 0) {
        std::extreme_value_distribution<double> gumbel(0.0, 1.0);
        std::vector<std::pair<double, size_t>> keyed;
        for (size_t i = 0; i < weights.size(); ++i)
          keyed.push_back({std::log(weights[i].first) / gumbel_temperature + gumbel(rng), i});
        std::sort(keyed.begin(), keyed.end(), [](auto& a, auto& b) { return a.first > b.first; });
        for (size_t i = 0; i < keyed.size() && static_cast<int>(i) < branch; ++i) {
          // Scaled back by the temperature so keys of different depths stay comparable.
          double noisy = keyed[i].first * gumbel_temperature - std::log(total);
          chosen.push_back({noisy, weights[keyed[i].second].first, weights[keyed[i].second].second});
        }
      } else {
        std::sort(weights.begin(), weights.end(), [](auto& a, auto& b) { return a.first > b.first; });
        for (size_t i = 0; i < weights.size() && static_cast<int>(i) < branch; ++i)
          chosen.push_back({std::log(weights[i].first / total), weights[i].first, weights[i].second});
      }
      for (const auto& [offset, w, tok] : chosen) {
        double p = parent_prob * w / total;
        if (p >= min_prob) heap.push({parent_key + offset, p, serial++, tok, parent, depth + 1});
      }
    };
    expand(-1, 1.0, 0.0, 0);
    while (!heap.empty() && static_cast<int>(out.tokens.size()) < budget) {
      Item it = heap.top();
      heap.pop();
      out.tokens.push_back(it.token);
      out.parents.push_back(it.parent);
      out.probs.push_back(it.prob);
      if (it.depth < max_depth) expand(static_cast<int32_t>(out.tokens.size()) - 1, it.prob, it.key, it.depth);
    }
    return out;
  }

  void clear() {
    entries_.clear();
    index_ = KeyIndex();
  }

 private:
  // uint64 key -> entry position (open addressing, linear probing; entries are never erased one by one).
  struct KeyIndex {
    std::vector<std::pair<uint64_t, int32_t>> slots = std::vector<std::pair<uint64_t, int32_t>>(1024, {0, -1});
    size_t count = 0;
    size_t mask() const { return slots.size() - 1; }
    static uint64_t mix(uint64_t k) {
      k ^= k >> 33;
      k *= 0xff51afd7ed558ccdULL;
      k ^= k >> 33;
      return k;
    }
    int32_t find(uint64_t k) const {
      for (size_t i = mix(k) & mask();; i = (i + 1) & mask()) {
        if (slots[i].first == 0) return -1;
        if (slots[i].first == k) return slots[i].second;
      }
    }
    void insert(uint64_t k, int32_t v) {
      if ((count + 1) * 4 > slots.size() * 3) {
        std::vector<std::pair<uint64_t, int32_t>> old(slots.size() * 2, {0, -1});
        old.swap(slots);
        count = 0;
        for (auto& s : old)
          if (s.first != 0) insert(s.first, s.second);
      }
      size_t i = mix(k) & mask();
      while (slots[i].first != 0) i = (i + 1) & mask();
      slots[i] = {k, v};
      ++count;
    }
  };

  uint64_t key(const int32_t* gram, int n) const {
    uint64_t h = static_cast<uint64_t>(n);
    for (int i = 0; i < n; ++i) h = h * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(gram[i] + 2);
    return h | 1;
  }

  const NgramEntry* lookup(uint64_t k) const {
    int32_t at = index_.find(k);
    return at < 0 ? nullptr : &entries_[at];
  }

  NgramEntry& entry_for(uint64_t k) {
    int32_t at = index_.find(k);
    if (at >= 0) return entries_[at];
    if (max_entries_ > 0 && static_cast<int64_t>(entries_.size()) >= max_entries_) clear();  // bounded memory
    index_.insert(k, static_cast<int32_t>(entries_.size()));
    entries_.emplace_back();
    return entries_.back();
  }

  void add(NgramEntry& e, int32_t token, float mass) {
    if (mass <= 0) return;
    e.total += mass;
    for (auto& nt : e.next)
      if (nt.token == token) {
        nt.mass += mass;
        std::sort(e.next.begin(), e.next.end(), [](auto& a, auto& b) { return a.mass > b.mass; });
        return;
      }
    if (static_cast<int>(e.next.size()) < width_) {
      e.next.push_back({token, mass, 0, 0});
    } else if (e.next.back().mass < mass) {
      e.next.back() = {token, mass, 0, 0};  // the lightest entry makes room
    } else {
      return;
    }
    std::sort(e.next.begin(), e.next.end(), [](auto& a, auto& b) { return a.mass > b.mass; });
  }

  int max_order_;
  int width_;
  int64_t max_entries_;
  std::vector<uint64_t> pow_;
  std::vector<NgramEntry> entries_;
  KeyIndex index_;
};

}  // namespace qd
