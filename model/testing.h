// Test hooks into a GradientEngine's selected parameters (finite-difference checks, training tests). Not for
// production code paths. Not thread-safe: Perturb changes the weights under any concurrent gradient pass.
#ifndef RAPIDIN_MODEL_TESTING_H_
#define RAPIDIN_MODEL_TESTING_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "model/engine.h"

namespace rapidin::model::testing {

// The selected parameters' current values, concatenated in gradient order.
std::vector<double> SelectedValues(const GradientEngine& engine);

// Every weight's current values (selected or not, in the model's name order), concatenated.
std::vector<double> AllValues(const GradientEngine& engine);

// Adds delta to element i of selected parameter p. OUT_OF_RANGE for no such element.
absl::Status Perturb(GradientEngine* engine, int p, int64_t i, double delta);

}  // namespace rapidin::model::testing

#endif  // RAPIDIN_MODEL_TESTING_H_
