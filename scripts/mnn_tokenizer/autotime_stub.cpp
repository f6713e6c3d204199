// MNN::Timer and MNN::AutoTime, the only symbols the tokenizer sources need from libMNN.
// AutoTime is silent here: MNN's prints each timed scope's duration to stdout.
#include <chrono>

#include <MNN/AutoTime.hpp>

namespace MNN {

static uint64_t nowInUs() {
    using namespace std::chrono;
    return duration_cast<microseconds>(steady_clock::now().time_since_epoch()).count();
}

Timer::Timer() { reset(); }
Timer::~Timer() {}
void Timer::reset() { mLastResetTime = nowInUs(); }
uint64_t Timer::durationInUs() { return nowInUs() - mLastResetTime; }

AutoTime::AutoTime(int line, const char* func) : Timer(), mLine(line), mName(nullptr) { (void)func; }
AutoTime::~AutoTime() {}

} // namespace MNN
