// oom_observers.cpp: the OOM observer registry of oom_observers.h. Relies on nothing but
// the standard library.
#include "oom_observers.h"

namespace mtia {

void OomObservers::add(OomObserver o) {
  std::lock_guard<std::mutex> g(mu_);
  list_.push_back(o);
}

bool OomObservers::notify(const OomReport& oom) const {
  std::vector<OomObserver> now;
  {
    std::lock_guard<std::mutex> g(mu_);
    now = list_;  // an observer may attach another: it is called from the next OOM on
  }
  for (const OomObserver& o : now)
    if (!o.call(o.handle, oom)) return false;
  return true;
}

OomObservers& oom_observers() {
  static auto* observers = new OomObservers();  // never destroyed: notified until exit
  return *observers;
}

}  // namespace mtia
