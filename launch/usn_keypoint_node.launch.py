"""Launch the certified keypoint node.

    ros2 launch usn_keypoint_ros usn_keypoint_node.launch.py bundle_dir:=/path/to/bundle \
        image_topic:=/camera/image_raw [backend:=auto] [use_sim_time:=true]
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.substitutions import EnvironmentVariable, LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

HERE = os.path.dirname(os.path.abspath(__file__))


def generate_launch_description():
    args = [
        DeclareLaunchArgument("bundle_dir", description="export bundle directory (usn-offline export --out)"),
        DeclareLaunchArgument("params_file", default_value=os.path.join(HERE, "usn_keypoint_node.params.yaml"),
                              description="ROS 2 parameters YAML for the node"),
        DeclareLaunchArgument("image_topic", default_value="/camera/image_raw", description="input image topic"),
        DeclareLaunchArgument("backend", default_value="auto", description="auto | tensorrt | onnxruntime | torch"),
        DeclareLaunchArgument("engine_file_path", default_value="", description="TensorRT engine (optional)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="true when replaying bags"),
        DeclareLaunchArgument(
            "fastdds_profile",
            default_value=EnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE",
                                              default_value=os.path.join(HERE, "fastdds_large_frames.xml")),
            description="Fast DDS profile (16 MiB shared-memory segment) under which camera-size frames "
                        "arrive over SENSOR_DATA QoS; the camera driver's process needs it too"),
    ]
    # Fast DDS reads the profile when a process starts: set it for every process this launch starts.
    profile = SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"))
    node = Node(
        package="usn_keypoint_ros",
        executable="keypoint_node",
        name="usn_keypoint_node",
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "bundle_dir": LaunchConfiguration("bundle_dir"),
                "backend": LaunchConfiguration("backend"),
                "engine_file_path": LaunchConfiguration("engine_file_path"),
                "use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
            },
        ],
        remappings=[("image", LaunchConfiguration("image_topic"))],
    )
    return LaunchDescription([*args, profile, node])
